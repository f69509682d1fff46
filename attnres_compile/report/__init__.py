"""Renderers: what the pass found and did, for people to read or look at.

Everything here takes plain results (a plan, a graph diff, depth weights) and
renders them; nothing here plans, rewrites or runs a model.
"""

from .depth_plot import plot_depth_weights
from .diff_html import diff_html, write_diff_html
from .diff_text import diff_text
from .plan import format_plan, plan_json, plan_report, render_table

__all__ = [
    "diff_html",
    "diff_text",
    "format_plan",
    "plan_json",
    "plan_report",
    "plot_depth_weights",
    "render_table",
    "write_diff_html",
]
