"""Result tables as text: markdown pipe tables, LaTeX tabulars, ``value [low, high]`` cells."""

from __future__ import annotations

import numpy as np
import pandas as pd


def cells(table: pd.DataFrame, groups: list[str], digits: int = 3) -> pd.DataFrame:
    """``value [low, high]`` text per model and group, for markdown and LaTeX."""
    def cell(row: pd.Series, group: str) -> str:
        value, low, high = row[group], row[f"{group}_low"], row[f"{group}_high"]
        if np.isnan(low):
            return f"{value:.{digits}f}"
        return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    return pd.DataFrame({"model": table["model"],
                         **{g: [cell(row, g) for _, row in table.iterrows()] for g in groups}})


def to_markdown(frame: pd.DataFrame) -> str:
    """A pipe table of text cells."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def to_latex(frame: pd.DataFrame) -> str:
    """A LaTeX ``tabular`` of text cells (the original prints such rows)."""
    def escape(text: object) -> str:
        return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace(
            "&", r"\&").replace("%", r"\%").replace("#", r"\#")

    lines = [r"\begin{tabular}{l" + "c" * (frame.shape[1] - 1) + "}", r"\hline",
             " & ".join(escape(c) for c in frame.columns) + r" \\", r"\hline"]
    lines += [" & ".join(escape(c) for c in row) + r" \\" for row in frame.itertuples(index=False)]
    return "\n".join([*lines, r"\hline", r"\end{tabular}"]) + "\n"
