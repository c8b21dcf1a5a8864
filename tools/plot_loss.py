"""Loss curves as one PNG, drawn with pillow: every run's loss per optimizer step, and a smoothed line over it.

    python tools/plot_loss.py runs/toy/pretrain runs/toy/finetune --out runs/toy/loss.png
    python tools/plot_loss.py runs/7b/finetune/metrics.jsonl --out loss.png --smooth 50

Each argument is a run's output directory (its metrics.jsonl is read) or a metrics.jsonl itself: one JSON object per
optimizer step with at least "step" and "loss", and, where train.py wrote them, "samples" and "image_samples" (the
global batch's sample count and how many of those have an image). A resumed run's rows replace the earlier ones from
the step it resumed at; a last line cut short (a run still writing, or killed) is passed over with a warning. Each run
gets its own panel, side by side:

- the loss of each step is a thin light line; over it, in bold, its exponential moving average (debiased), where an
  isolated spike weighs no more than an ordinary noisy step.
- the y range follows the loss's running median, not its extremes, so a few spikes do not squash the curve into the
  bottom of the panel. What falls outside is drawn on the edge, marked by a triangle outside it: nothing is hidden.
- a step whose batch was text-only is a dot, not joined into the line nor counted in the average or the range: the
  loss on text-only replies is another quantity, early in stage 2 far above the rest, and joined in it would draw
  spikes that read as instability. A mostly-text step (under half the samples with an image) is marked with a ring.
"""

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import UserError  # noqa: E402

SCALE = 2  # drawn at twice the size, then shrunk: pillow's lines and text are not anti-aliased otherwise
COLORS = [(31, 119, 180), (230, 110, 10), (44, 150, 44), (148, 103, 189), (214, 39, 40), (120, 80, 70)]
INK, GRID, FRAME = (40, 40, 40), (228, 228, 228), (170, 170, 170)
MARKS = {"text": "dot", "mostly text": "ring"}  # a batch's kind (batch_kind) -> its marker (draw_marker)


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def read_metrics(path):
    """The rows of a metrics.jsonl, or of the one in the run directory `path`, one per step. Every row must have a
    step and a loss. A last line that is not JSON is a row train.py is still writing, or was writing when it was
    killed: it is left out, with a warning. After a resume the file repeats steps; each row replaces the rows of its
    step and later ones (what the run redid), so that the curve is the one the checkpoints followed."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (a run's output directory holds metrics.jsonl, one line per "
                        "optimizer step)")
    with open(path, encoding="utf-8", errors="replace") as f:  # bytes a crash left: a line that is not JSON
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows, replaced = [], 0
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == lines[-1][0]:
                print(f"warning: {path}, line {number}: passed over, cut short (a run still writing, or killed)",
                      file=sys.stderr)
                continue
            raise UserError(f"{path}, line {number}: not JSON ({e}); remove or repair the line") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and math.isfinite(row["step"])
                and isinstance(row.get("loss"), (int, float))):
            raise UserError(f"{path}, line {number}: a row needs a numeric \"step\" and \"loss\", "
                            f"got {line.strip()[:80]}")
        while rows and rows[-1]["step"] >= row["step"]:  # a resumed run redoes the steps from its checkpoint on
            rows.pop()
            replaced += 1
        rows.append(row)
    if replaced:
        print(f"{path}: {replaced} rows replaced by those of a resumed run", file=sys.stderr)
    finite = [r for r in rows if math.isfinite(r["loss"])]
    if len(finite) < len(rows):
        first = next(r["step"] for r in rows if not math.isfinite(r["loss"]))
        print(f"warning: {path}: {len(rows) - len(finite)} steps with a loss of NaN or inf (the first: step {first}) "
              "are not drawn", file=sys.stderr)
    if not finite:
        raise UserError(f"{path}: no rows with a loss (has the run finished an optimizer step yet?)")
    return finite


def run_label(path):
    """A run's name on the chart: its directory's ("finetune" for runs/toy/finetune/metrics.jsonl)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        head, name = os.path.split(path)
        path = head if name == "metrics.jsonl" else os.path.splitext(path)[0]
    return os.path.basename(path)


def batch_kind(row):
    """"text" for a batch without an image, "mostly text" for one with images in under half its samples, else None
    (also when the row does not say)."""
    images, samples = row.get("image_samples"), row.get("samples")
    if images is None:
        return None
    if images == 0:
        return "text"
    return "mostly text" if samples and images < samples / 2 else None


# ----------------------------------------------------------------------------------------------------------------------
# Numbers: smoothing, the y range, ticks


def default_span(n):
    """The moving average spans about a twentieth of the run: long enough to calm the noise, short enough to follow
    the fall at the start."""
    return min(100, max(1, round(n / 20)))


def ema(values, span):
    """Exponential moving average over about `span` values, debiased: dividing by 1 - beta^t undoes the pull towards
    the zero it starts from (Adam's bias correction), so the first points are the loss's, not dragged down."""
    beta, avg, out = 1 - 2 / (span + 1), 0.0, []
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def running_median(values, half):
    """Each value's median with up to `half` neighbours on either side. The window narrows towards the ends, so that a
    fast fall at the start is followed, but keeps three values (the first three for the first step): an isolated
    spike, wherever it is, never moves it."""
    out, n = [], len(values)
    for i in range(n):
        k = max(1, min(half, i, n - 1 - i))
        start = min(max(0, i - k), max(0, n - 2 * k - 1))
        out.append(statistics.median_low(values[start:start + 2 * k + 1]))  # median_low: two values, the lower
    return out


def trend(losses):
    """The loss's running median (over about a fiftieth of the run) and the noise around it: a standard deviation
    estimated from the median absolute deviation, which one spike does not inflate as it would the plain one."""
    base = running_median(losses, half=min(50, max(2, len(losses) // 50)))
    return base, 1.4826 * statistics.median(abs(v - b) for v, b in zip(losses, base))


def y_range(losses):
    """(low, high) for a panel: the lowest and highest losses within the running median's span widened by the noise
    around it (3 sigma), plus a 5% margin. The extremes alone would let one spike set the scale."""
    base, sigma = trend(losses)
    band = (min(base) - 3 * sigma, max(base) + 3 * sigma)
    inside = [v for v in losses if band[0] <= v <= band[1]]  # never empty: the median's values are losses
    lo, hi = min(inside), max(inside)
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05  # a flat curve (or a single step) still gets a range
    return lo - pad, hi + pad


def smoothed(losses, span):
    """The bold line: a moving average of the loss, each step's value first limited to its running median +- 3 sigma,
    so that an isolated spike moves the line no more than an ordinary noisy step would (the thin line still shows
    it). A rise that lasts moves the median, and so the line."""
    base, sigma = trend(losses)
    return ema([min(max(v, b - 3 * sigma), b + 3 * sigma) for v, b in zip(losses, base)], span)


def nice_ticks(lo, hi, count=5, min_step=0.0):
    """About `count` round values inside [lo, hi], 1, 2 or 5 times a power of ten apart, and the decimals their
    labels need."""
    target = max((hi - lo) / count, min_step, 1e-12)
    power = 10 ** math.floor(math.log10(target))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= min_step), key=lambda s: abs(math.log(s / target)))
    ticks = [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


# ----------------------------------------------------------------------------------------------------------------------
# Drawing


def load_font(size):
    """Pillow's built-in scalable font (Pillow >= 10.1 built with FreeType, as its wheels are): no font file needed."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def tint(color, amount):
    """`color` mixed with white: amount 0 is the colour, 1 is white."""
    return tuple(round(c + (255 - c) * amount) for c in color)


def draw_vertical_text(canvas, center, text, font, fill):
    """Text turned 90 degrees anticlockwise, centred on `center` (the y axis's label)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right, bottom), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    x, y = round(center[0] - mask.width / 2), round(center[1] - mask.height / 2)
    canvas.paste(fill, (x, y, x + mask.width, y + mask.height), mask)


def draw_marker(draw, kind, x, y, color, s):
    """The chart's symbols: "dot" a text-only step, "ring" a mostly-text one, "up"/"down" a value off the scale."""
    r = 3 * s
    if kind == "dot":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=INK)
    elif kind == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=INK, width=s)
    elif kind == "up":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    elif kind == "down":
        draw.polygon([(x, y + r), (x - r, y - r), (x + r, y - r)], fill=color)


def draw_legend(draw, entries, box, font, s):
    """Entries (symbol, colour, text) left to right, wrapping onto a new line; returns the height used."""
    x0, y0, x1 = box
    x, y, line = x0, y0, font.size + 6 * s
    for symbol, color, text in entries:
        width = 22 * s + draw.textlength(text, font=font) + 16 * s
        if x > x0 and x + width > x1:
            x, y = x0, y + line
        cy = y + line // 2
        if symbol == "run":  # a light line (the loss of each step) under a bold one (its average)
            draw.line([(x, cy + 3 * s), (x + 18 * s, cy - 3 * s)], fill=tint(color, 0.55), width=s)
            draw.line([(x, cy), (x + 18 * s, cy)], fill=color, width=2 * s)
        else:
            draw_marker(draw, symbol, x + 9 * s, cy, color, s)
        draw.text((x + 22 * s, cy), text, fill=INK, font=font, anchor="lm")
        x += width
    return y + line - y0


def prepare(rows, smooth=None):
    """What a panel shows, computed before anything is drawn: steps, losses, each batch's kind, the steps the
    average covers (those with an image), the span of that average and the y range."""
    kinds = [batch_kind(r) for r in rows]
    kept = [i for i, k in enumerate(kinds) if k != "text"] or list(range(len(rows)))
    losses = [r["loss"] for r in rows]
    # text-only steps are another quantity: they neither set the scale nor enter the average
    return dict(steps=[r["step"] for r in rows], losses=losses, kinds=kinds, kept=kept,
                span=smooth or default_span(len(kept)), y_range=y_range([losses[i] for i in kept]))


def symbols_used(panel):
    """The legend's symbols this panel draws: "dot", "ring", "edge"."""
    lo, hi = panel["y_range"]
    used = {MARKS[k] for k in panel["kinds"] if k}
    return used | ({"edge"} if any(not lo <= v <= hi for v in panel["losses"]) else set())


def draw_panel(draw, box, label, panel, color, font, s):
    """One run inside box (x0, y0, x1, y1): gridlines and ticks, the loss of each step, its moving average, the
    markers, and a title above."""
    x0, y0, x1, y1 = box
    steps, losses, kinds, kept = panel["steps"], panel["losses"], panel["kinds"], panel["kept"]
    lo, hi = panel["y_range"]
    first, last = min(steps), max(steps)
    if first <= 0.1 * (last - first) + 1:
        first = 0  # a run from its start: the axis starts at step 0
    if last == first:
        first, last = first - 1, last + 1

    def xy(step, loss):
        return (x0 + (step - first) / (last - first) * (x1 - x0),
                y1 - (min(max(loss, lo), hi) - lo) / (hi - lo) * (y1 - y0))

    # the grid, with tick labels left of and below the panel
    ticks, decimals = nice_ticks(lo, hi)
    for v in ticks:
        y = xy(first, v)[1]
        if y0 + 2 * s < y < y1 - 2 * s:  # not a second line beside the frame
            draw.line([(x0, y), (x1, y)], fill=GRID, width=s)
        draw.text((x0 - 6 * s, y), f"{v:.{decimals}f}", fill=INK, font=font, anchor="rm")
    for v in nice_ticks(first, last, min_step=1)[0]:
        x = xy(v, lo)[0]
        if x0 + 2 * s < x < x1 - 2 * s:
            draw.line([(x, y0), (x, y1)], fill=GRID, width=s)
        draw.text((x, y1 + 10 * s), f"{v:.0f}", fill=INK, font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=FRAME, width=s)

    # the loss of each step with images, clamped to the range (what is off the scale runs along the edge), then its
    # average; text-only steps are only dots, so that their loss, of another kind, draws no spikes across the panel
    raw = [xy(st, v) for st, v in zip(steps, losses)]
    line = [raw[i] for i in kept]
    smooth = [xy(steps[i], v) for i, v in zip(kept, smoothed([losses[i] for i in kept], panel["span"]))]
    for points, fill, width in ((line, tint(color, 0.55), s), (smooth, color, 2 * s)):
        if len(points) > 1:
            draw.line(points, fill=fill, width=width, joint="curve")
        else:
            (x, y), r = points[0], 2 * width
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    for (x, y), loss, kind in zip(raw, losses, kinds):
        if kind is not None:
            draw_marker(draw, MARKS[kind], x, y, color, s)
        if not lo <= loss <= hi:  # the triangle just outside the frame, so a dot on the edge stays visible
            draw_marker(draw, "up" if loss > hi else "down", x, y - 5 * s if loss > hi else y + 5 * s, color, s)

    # the title: as much of it as fits
    n_text, title = kinds.count("text"), label
    for part in (f" \u00b7 {len(steps)} step{'s' * (len(steps) > 1)}", f" \u00b7 {n_text} text-only" if n_text else "",
                 f" \u00b7 averaged over ~{panel['span']}" if panel["span"] > 1 else ""):
        if draw.textlength(title + part, font=font) <= x1 - x0:
            title += part
    draw.text((x0, y0 - 10 * s), title, fill=color, font=font, anchor="ld")


def plot_loss(runs, path, size=(960, 420), smooth=None, title=None):
    """Draw runs, a list of (label, rows) with rows as read_metrics returns them, side by side into the PNG `path`
    of `size` pixels. smooth: the moving average's span in steps (default: about a twentieth of each run)."""
    from PIL import Image, ImageDraw

    if not runs:
        raise ValueError("plot_loss: no run to draw")
    s, (width, height) = SCALE, size
    canvas = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(canvas)
    font = load_font(12 * s)
    margin = 12 * s
    top = margin
    if title:
        draw.text((margin, top), title, fill=INK, font=font)
        top += font.size + 6 * s

    panels = [prepare(rows, smooth) for _, rows in runs]
    used = set().union(*map(symbols_used, panels))
    counted = any("image_samples" in r for _, rows in runs for r in rows)
    entries = [("run", COLORS[i % len(COLORS)], label) for i, (label, _) in enumerate(runs)]
    entries.append(("run", (120, 120, 120), "loss per step (light), moving average (bold)"
                    + (" of the batches with images" if "dot" in used else "")))
    if counted:  # said even when there is none, so that a reader knows the chart would show them
        entries.append(("dot", INK, "text-only batch (no image)"))
    if "ring" in used:
        entries.append(("ring", INK, "mostly text (under half with an image)"))
    if "edge" in used:
        entries.append(("up", (120, 120, 120), "off the scale: drawn at the edge, marked outside it"))
    top += draw_legend(draw, entries, (margin + 24 * s, top, width * s - margin), font, s)

    # panels side by side, each with its own axes; room on the left for the y label and each panel's tick labels
    label_gap, tick_gap, panel_gap = 24 * s, 40 * s, 52 * s
    y0 = top + font.size + 16 * s  # the panel titles sit above, then a row for the off-scale triangles
    y1 = height * s - margin - 2 * font.size - 16 * s  # the triangles' row, tick labels and the x label sit below
    left, right = margin + label_gap + tick_gap, width * s - margin
    panel_width = (right - left - panel_gap * (len(runs) - 1)) / len(runs)
    if y1 - y0 < 20 * s or panel_width < 20 * s:
        raise ValueError(f"plot_loss: {width}x{height} pixels is too small for {len(runs)} panel(s)")
    for i, ((label, _), panel) in enumerate(zip(runs, panels)):
        x0 = left + i * (panel_width + panel_gap)
        draw_panel(draw, (round(x0), y0, round(x0 + panel_width), y1), label, panel, COLORS[i % len(COLORS)], font, s)
        draw.text((x0 + panel_width / 2, height * s - margin), "optimizer step", fill=INK, font=font, anchor="md")
    draw_vertical_text(canvas, (margin + font.size // 2, (y0 + y1) / 2), "training loss", font, INK)
    canvas.resize((width, height), Image.LANCZOS).save(path, format="PNG")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output directories or metrics.jsonl files, one panel each")
    p.add_argument("--out", default="loss.png", help="the PNG to write")
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--height", type=int, default=420)
    p.add_argument("--smooth", type=int, default=None, help="the moving average's span in steps (default: about a "
                   "twentieth of each run)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    for flag, value in (("--width", args.width), ("--height", args.height), ("--smooth", args.smooth)):
        if value is not None and value < 1:
            p.error(f"argument {flag}: must be a positive integer, got {value}")
    try:
        runs = [(run_label(path), read_metrics(path)) for path in args.runs]
        plot_loss(runs, args.out, (args.width, args.height), args.smooth, args.title)
    except (UserError, OSError, ValueError) as e:  # ValueError: too small a size for the panels
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(args.out)


if __name__ == "__main__":
    main()
