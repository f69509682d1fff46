# Sourced by the scripts here: sets $python to the interpreter they run,
# $PYTHON if set, else the checkout's .venv, else python3 (from the checkout's root).
python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then
        python=.venv/bin/python
    else
        python=python3
    fi
fi
