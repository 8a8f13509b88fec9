"""``--plot``: a waterfall per contender (network, decode and processor lanes)."""
from __future__ import annotations

COLORS = {"startup": "#9467bd", "connect": "#7f7f7f", "wait": "#c7c7c7", "download": "#1f77b4",
          "decode": "#ff7f0e", "process": "#2ca02c"}
LANE = {"net": 0.28, "decode": 0.0, "process": -0.28}
H = 0.24


def _med(s: dict, k: str):
    v = s.get(k)
    return v["median"] if v else None


def plot(summary: dict, contenders: list[str], path: str, title: str,
         against: str = "warm") -> None:
    """``against``: what each contender's ratio is a ratio to, for its label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in contenders if summary[c].get("total")]
    fig, ax = plt.subplots(figsize=(12, 1.1 * len(names) + 2.2))
    xscale = max(_med(summary[c], "total") for c in names) if names else 1.0
    xmax = 0.0
    for i, c in enumerate(names):
        xmax = max(xmax, _contender(ax, summary[c], len(names) - 1 - i, xscale, against))
    ax.set_yticks([len(names) - 1 - i for i in range(len(names))])
    ax.set_yticklabels(names)
    has_startup = any(summary[c].get("startup_s") for c in names)
    ax.set_xlim(-(0.45 if has_startup else 0.03) * xmax, xmax * 1.5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("seconds since the job was submitted (medians); lanes per contender: "
                  "network / decode / processor")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    _legend(ax, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _contender(ax, s: dict, y: int, xscale: float, against: str) -> float:
    """One contender's three lanes at height ``y``; returns its total."""
    total = _med(s, "total")
    connect, fb = _med(s, "connect"), _med(s, "first_byte")
    dl, moov = _med(s, "download_done"), _med(s, "moov_ready")
    ff, fr, dec = _med(s, "first_frame"), _med(s, "first_result"), _med(s, "decode_done")
    net = y + LANE["net"]
    if s.get("startup_s"):                  # not to scale: it would dwarf the job
        stub = 0.12 * xscale
        ax.barh(net, stub, left=-stub, height=H, color=COLORS["startup"], hatch="//",
                edgecolor="white")
        ax.text(-stub, net, f"start-up {s['startup_s']:.1f} s (not to scale) ",
                va="center", ha="right", fontsize=7, color=COLORS["startup"])
    if connect:
        ax.barh(net, connect, left=0, height=H, color=COLORS["connect"])
    if fb is not None and fb > (connect or 0):
        ax.barh(net, fb - (connect or 0), left=connect or 0, height=H, color=COLORS["wait"])
    if dl is not None:
        start = fb or connect or 0
        ax.barh(net, max(dl - start, 0.003), left=start, height=H, color=COLORS["download"])
    elif moov is not None:                   # pyav-url: only "open" is known
        ax.barh(net, moov, left=0, height=H, color=COLORS["wait"])
        ax.text(moov, net, "  open; download then interleaved with decode",
                va="center", fontsize=7, color="#555")
    dstart = _med(s, "decode_start") or _med(s, "written") or moov or dl or 0
    if ff is not None:
        ax.barh(y + LANE["decode"], max((dec or total) - dstart, 0.003), left=dstart, height=H,
                color=COLORS["decode"])
        ax.plot([ff], [y + LANE["decode"]], marker="D", color="black", ms=5)
    if fr is not None:
        ax.barh(y + LANE["process"], max(total - fr, 0.003), left=fr, height=H,
                color=COLORS["process"])
        ax.plot([fr], [y + LANE["process"]], marker="^", color="#d62728", ms=6)
    ax.plot([total, total], [y - 0.45, y + 0.45], color="black", lw=1)
    ratio = s.get("ratio_total")
    label = f" total {total:.2f} s" + (f" ({ratio:.2f}x {against})" if ratio else "")
    if s.get("frames") is not None:
        label += f", {s['frames']:.0f} frames"
    ax.text(total, y, label, va="center", fontsize=8)
    return total


def _legend(ax, plt) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(color=COLORS[k], label=k) for k in
               ("startup", "connect", "wait", "download", "decode", "process")]
    handles += [plt.Line2D([], [], marker="D", color="black", ls="", label="first frame"),
                plt.Line2D([], [], marker="^", color="#d62728", ls="", label="first result")]
    handles[0].set_label("engine start-up (before submit)")
    handles[2].set_label("connect/wait for first byte")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), fontsize=7,
              ncol=4, frameon=False)
