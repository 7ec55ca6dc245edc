"""Training curves of focusft.py runs, drawn from their metrics.jsonl into PNGs (matplotlib, optional).

    python scripts/plot_metrics.py runs/demo/sft runs/demo/focusft         # SFT beside FocuSFT
    python scripts/plot_metrics.py runs/sft-s1 runs/sft-s2 runs/focusft-s1 runs/focusft-s2 \\
        --labels SFT SFT FocuSFT FocuSFT                                     # each the mean over its seeds

training.png: per optimizer step, the loss (for FocuSFT also the loss before its inner loop, dashed), the
learning rate and the gradient norm. diagnostics.png, when the runs measured them (focusft.py --attn-every):
the sink mass and the context engagement of response queries, with the base weights (solid) and with the
fast weights (dashed). Runs under one label are drawn as their mean at the steps they all logged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import read_metrics  # noqa: E402

PROG = "plot_metrics.py"
# (file, [(panel title, [(metrics.jsonl key, sub-key or None, line style, legend suffix)])])
FIGURES = [
    ("training.png", [
        ("loss", [("loss", None, "-", ""), ("inner_first", None, "--", ", before the inner loop")]),
        ("learning rate", [("lr", None, "-", "")]),
        ("gradient norm", [("grad_norm", None, "-", "")]),
    ]),
    ("diagnostics.png", [
        ("sink mass of response queries", [("attn_base", "sink_mass", "-", ""),
                                           ("attn_fast", "sink_mass", "--", ", with fast weights")]),
        ("context engagement", [("attn_base", "context_engagement", "-", ""),
                                ("attn_fast", "context_engagement", "--", ", with fast weights")]),
    ]),
]


def curve(runs: list[list[dict]], key: str, sub: str | None) -> tuple[list[int], list[float]]:
    """The steps every run logged `key` at, and the mean over the runs of row[key] (or row[key][sub]) there;
    nothing when a run never logged it (SFT has no inner loop)."""
    per_run = [{r["step"]: r[key] if sub is None else r[key][sub] for r in rows if key in r} for rows in runs]
    if not all(per_run):
        return [], []
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    return steps, [sum(values[s] for values in per_run) / len(per_run) for s in steps]


def figures(runs: dict[str, list[list[dict]]]) -> dict:
    """{file name: matplotlib figure} for runs given as {label: [each run's metrics rows]}; a figure none of
    whose curves any run logged is left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = {}
    for name, panels in FIGURES:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
        drawn = False
        for ax, (title, lines) in zip(axes, panels, strict=True):
            for i, (label, rows) in enumerate(runs.items()):
                for key, sub, style, suffix in lines:
                    steps, values = curve(rows, key, sub)
                    if steps:
                        ax.plot(steps, values, style, color=f"C{i}", label=label + suffix)
                        drawn = True
            ax.set(title=title, xlabel="optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        if drawn:
            made[name] = fig
        else:
            plt.close(fig)
    return made


def plot(runs: dict[str, list[list[dict]]], out: Path) -> list[str]:
    """Draw the figures into out as PNGs; returns their file names."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = figures(runs)
    for name, fig in made.items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    return list(made)


def fail(message: str) -> None:
    raise SystemExit(f"{PROG}: error: {message}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="focusft.py output directories (their --out)")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one per RUN_DIR; runs with the same label are drawn as their mean (default: each run's "
                        "path below the runs' common directory)")
    p.add_argument("--out", metavar="DIR",
                   help="where the PNGs go (default: the run's directory for one run, else the runs' common "
                        "directory)")
    args = p.parse_args(argv)
    dirs = [Path(d) for d in args.runs]
    if args.labels and len(args.labels) != len(dirs):
        p.error(f"--labels: {len(args.labels)} given for {len(dirs)} RUN_DIRs; give one per RUN_DIR")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("matplotlib is not installed (pip install matplotlib)")
    common = Path(os.path.commonpath([d.resolve() for d in dirs]))
    labels = args.labels or [d.name if len(dirs) == 1 else d.resolve().relative_to(common).as_posix() for d in dirs]
    runs: dict[str, list[list[dict]]] = {}
    for label, d in zip(labels, dirs, strict=True):
        path = d / "metrics.jsonl"
        if not path.is_file():
            fail(f"{d}: no metrics.jsonl (not a focusft.py output directory)")
        try:
            rows = read_metrics(path)
        except json.JSONDecodeError as e:
            fail(f"{path}: not focusft.py's metrics ({e})")
        if not any("loss" in r for r in rows):
            fail(f"{path}: no optimizer step logged yet")
        runs.setdefault(label, []).append(rows)
    out = Path(args.out) if args.out else common
    made = plot(runs, out)
    print(f"wrote {', '.join(str(out / name) for name in made)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
