"""PNG plots of a results document: speedup against density, and a roofline chart.

Both are drawn from the plain ``results.json`` document (not from live objects), so a run and
``python -m bench plot RESULTS.json`` produce the same pictures, and committed results files can be
re-plotted later. matplotlib is used through its object API with the Agg canvas: no pyplot state,
no display needed.

* ``speedup.png`` (one per op when a run has several: ``speedup-<op>.png``): a grid of panels, one
  row per (shape, dtype) and one column per M. In each, x is the weight's density (kept fraction),
  y its speedup over dense (log scale, dense = 1 as a dashed line); each line is one implementation
  on one layout family (``b64`` = 64x64 blocks at every density measured, ``N:4`` = the N:4
  patterns). A red x on the bottom edge marks a WRONG result (it has no speedup by design).
* ``roofline.png``: useful TFLOP/s against arithmetic intensity (useful FLOPs per byte that must
  move), log-log, one point per correct measurement; color = implementation, marker = dtype. On a
  GPU of the peak table the roofs (``min(peak, bandwidth * intensity)``) are drawn per dtype.
* ``e2e.png`` (e2e suite): per model variant, training tokens/s, decode tokens/s (speedup over the
  dense model written on each bar) and the held-out loss before and after the training steps.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .roofline import Peak, arithmetic_intensity

BASELINE = "dense"  # repeated here (not imported) so plotting never imports torch-heavy modules
DPI = 110
PANEL_WIDTH, PANEL_HEIGHT = 3.4, 2.7
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DTYPE_MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}
FAMILY_STYLES = ("-", "--", "-.", ":")
FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def layout_family(layout: str) -> str:
    """The line a layout belongs to: ``b64d0.1`` -> ``b64``, ``2:4`` -> ``N:4``."""
    if layout.startswith("b") and "d" in layout:
        return layout.split("d", 1)[0]
    return "N:" + layout.split(":", 1)[1]


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def implementation_colors(document: dict[str, Any]) -> dict[str, str]:
    names = document.get("run", {}).get("implementations") or _unique(
        name for cell in document["cells"] for name in cell["results"]
    )
    return {name: COLORS[index % len(COLORS)] for index, name in enumerate(names)}


def speedup_series(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """``(implementation, family) -> [(density, speedup), ...]`` sorted by density, correct
    measurements of the non-baseline implementations only."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for cell in cells:
        for name, measurement in cell["results"].items():
            if name == BASELINE or measurement["status"] != "ok" or measurement.get("speedup") is None:
                continue
            series[(name, layout_family(cell["layout"]))].append((cell["density"], measurement["speedup"]))
    return {key: sorted(points) for key, points in series.items()}


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _title(document: dict[str, Any]) -> str:
    environment = document.get("environment", {})
    gpu = environment.get("gpu")
    if gpu:
        machine = gpu.get("name", "GPU")
    else:
        machine = f"{environment.get('cpu_model') or 'CPU'}, {environment.get('torch_threads')} threads"
        if environment.get("cpu_isa"):
            machine += f", {environment['cpu_isa']}"
    date = (environment.get("date_utc") or "")[:10]
    return f"{machine}, torch {environment.get('torch')}, {date}"


def speedup_figure(document: dict[str, Any], op: str) -> Figure:
    cells = [cell for cell in document["cells"] if cell["op"] == op and cell.get("density") is not None]
    if not cells:
        raise ValueError(f"no cells with op {op!r} to plot")
    rows = _unique((cell["shape"], cell["dtype"]) for cell in cells)
    columns = _unique(cell["M"] for cell in cells)
    colors = implementation_colors(document)
    families = _unique(layout_family(cell["layout"]) for cell in cells)
    figure = Figure(figsize=(PANEL_WIDTH * len(columns) + 1.5, PANEL_HEIGHT * len(rows) + 1.0), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), squeeze=False, sharex=True)
    handles: dict[str, Any] = {}
    for row, (shape, dtype) in enumerate(rows):
        for column, rows_m in enumerate(columns):
            ax = axes[row][column]
            panel = [c for c in cells if (c["shape"], c["dtype"], c["M"]) == (shape, dtype, rows_m)]
            handles.setdefault(BASELINE, ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=BASELINE))
            for (name, family), points in speedup_series(panel).items():
                index = families.index(family)
                label = f"{name} {family}"
                (line,) = ax.plot(*zip(*points), FAMILY_STYLES[index % len(FAMILY_STYLES)], color=colors.get(name),
                                  marker=FAMILY_MARKERS[index % len(FAMILY_MARKERS)], markersize=5, label=label)
                handles.setdefault(label, line)
            wrong = [c["density"] for c in panel for m in c["results"].values() if m["status"] == "wrong"]
            if wrong:
                marks = ax.scatter(wrong, [0.03] * len(wrong), marker="x", color="red", s=40,
                                   transform=ax.get_xaxis_transform(), clip_on=False, label="WRONG result")
                handles.setdefault("WRONG result", marks)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{shape} {dtype}, M={rows_m}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if row == len(rows) - 1:
                ax.set_xlabel("density (kept fraction)")
            if column == 0:
                ax.set_ylabel("speedup over dense")
    figure.suptitle(f"{op}: speedup over dense F.linear ({_title(document)})", fontsize=10)
    figure.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    return figure


def roofline_figure(document: dict[str, Any], peak: Optional[Peak]) -> Figure:
    colors = implementation_colors(document)
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    ax = figure.add_subplot()
    intensities, dtypes = [], []
    seen = set()
    for cell in document["cells"]:
        intensity = arithmetic_intensity(cell["useful_flops"], cell["bytes_needed"])
        if intensity is None:
            continue
        for name, measurement in cell["results"].items():
            if measurement["status"] != "ok" or not measurement.get("tflops"):
                continue
            label = f"{name} {cell['dtype']}"
            ax.scatter(
                intensity, measurement["tflops"], color=colors.get(name), s=22, alpha=0.8,
                marker=DTYPE_MARKERS.get(cell["dtype"], "o"), label=None if label in seen else label,
            )
            seen.add(label)
            intensities.append(intensity)
            dtypes.append(cell["dtype"])
    if not intensities:
        raise ValueError("no correct, timed measurement to plot")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if peak is not None:
        low, high = min(intensities) / 2, max(intensities) * 2
        for dtype in _unique(dtypes):
            compute = peak.tflops.get(dtype)
            if compute is None:
                continue
            ridge = compute / peak.memory_tbps
            xs = sorted({low, high, min(max(ridge, low), high)})
            ax.plot(xs, [min(compute, peak.memory_tbps * x) for x in xs], color="black", linewidth=1,
                    linestyle=FAMILY_STYLES[_unique(dtypes).index(dtype) % len(FAMILY_STYLES)],
                    label=f"{peak.model} roof {dtype} ({compute:g} TFLOP/s, {peak.memory_tbps:g} TB/s)")
        subtitle = f"roofs from the peak table: {peak.model}"
    else:
        subtitle = "no peak-table entry for this device: measured points only"
    ax.set_xlabel("arithmetic intensity (useful FLOPs / needed bytes)")
    ax.set_ylabel("useful TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Roofline, {_title(document)}\n{subtitle}", fontsize=9)
    return figure


def e2e_figure(document: dict[str, Any]) -> Figure:
    records = document.get("e2e") or []
    if not records:
        raise ValueError("no e2e records to plot")
    variants = [record["variant"] for record in records]
    positions = list(range(len(records)))
    figure = Figure(figsize=(12, 1.2 + 0.55 * len(records)), layout="constrained")
    panels = figure.subplots(1, 3, sharey=True)
    for ax, (key, speedup_key, label) in zip(panels, (
        ("train_tokens_per_s", "train_speedup", "training tokens/s"),
        ("decode_tokens_per_s", "decode_speedup", "decode tokens/s"),
    )):
        values = [record.get(key) or 0.0 for record in records]
        ax.barh(positions, values, color=[COLORS[0] if v == "dense" else COLORS[1] for v in variants])
        for position, record, value in zip(positions, records, values):
            if record["status"] != "ok":
                note = record["status"].upper()
            else:
                speedup = record.get(speedup_key)
                note = f" {speedup:.2f}x" if speedup is not None else ""
            ax.text(value, position, note, va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.margins(x=0.2)
    losses = panels[2]
    height = 0.38
    losses.barh([p - height / 2 for p in positions], [r.get("loss_initial") or 0.0 for r in records], height,
                color="#bbbbbb", label="before training")
    losses.barh([p + height / 2 for p in positions], [r.get("loss_after_steps") or 0.0 for r in records], height,
                color=COLORS[2], label=f"after {document.get('run', {}).get('workload', {}).get('steps', '?')} steps")
    losses.set_xlabel("held-out loss")
    losses.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    panels[0].set_yticks(positions, variants)
    panels[0].invert_yaxis()
    run = document.get("run", {})
    config = run.get("config", {})
    figure.suptitle(f"e2e: GPT d_model={config.get('d_model')} layers={config.get('n_layers')}, MLPs sparsified, "
                    f"{run.get('dtype')} ({_title(document)})", fontsize=10)
    return figure


def write_plots(document: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    """Write the speedup plot(s) and the roofline chart of ``document`` into ``out_dir``; returns the
    paths. Nothing is written for a document without correct measurements."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if document.get("e2e"):
        # "NAME-e2e-" (a saved e2e results file) gives NAME-e2e.png rather than NAME-e2e-e2e.png
        name = f"{prefix[:-1]}.png" if prefix.endswith("e2e-") else f"{prefix}e2e.png"
        return [_save(e2e_figure(document), out_dir / name)]
    ops = _unique(cell["op"] for cell in document["cells"])
    paths = []
    for op in ops:
        name = "speedup.png" if len(ops) == 1 else f"speedup-{op}.png"
        try:
            figure = speedup_figure(document, op)
        except ValueError:
            continue
        paths.append(_save(figure, out_dir / f"{prefix}{name}"))
    peak_record = document.get("environment", {}).get("gpu_peak")
    peak = Peak.from_dict(peak_record) if peak_record else None
    try:
        paths.append(_save(roofline_figure(document, peak), out_dir / f"{prefix}roofline.png"))
    except ValueError:
        pass
    return paths
