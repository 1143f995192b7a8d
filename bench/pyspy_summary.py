"""Summarise py-spy's collapsed stacks (`py-spy record --format raw`) into ranked tables.

Self time: the frame on top of the stack. Inclusive time: every frame on the stack,
counted once per sample. Frames under `gateway/` are also listed on their own, since
those are the ones this project can change.

    python bench/pyspy_summary.py bench/results/profile.txt [--top 25]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any, Final


def _short(frame: str) -> str:
    """`handle (gateway/app.py:241)` -> `handle (gateway/app.py)`: lines merged per function."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
    return f"{name} ({path})"


# A thread parked in one of these (a log writer waiting for lines) is idle, though py-spy
# samples it as running; its stacks are left out.
IDLE_LEAVES: Final = ("Condition.wait (threading.py", "Event.wait (threading.py")


def summarize(path: Path | str, top: int = 40) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    total = idle = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        self_lines[frames[-1]] += n
        self_time[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n

    def ranked(counter: Counter[str], only_gateway: bool = False) -> list[tuple[str, float]]:
        # Entry points on every stack (main, the event loop) say nothing: dropped.
        items = [
            (f, c)
            for f, c in counter.most_common()
            if c < 0.99 * total and (not only_gateway or "(gateway/" in f)
        ]
        return [(f, round(100 * c / total, 2)) for f, c in items[:top]] if total else []

    return {
        "samples": total,
        "idle_thread_samples": idle,
        "self": ranked(self_time),
        "self_lines": ranked(self_lines),
        "inclusive": ranked(inclusive),
        "inclusive_gateway": ranked(inclusive, only_gateway=True),
    }


def format_summary(summary: dict[str, Any], top: int = 20) -> str:
    lines: list[str] = []
    for key, title in (
        ("self", "self time (top of stack), by function"),
        ("inclusive_gateway", "inclusive time, gateway/ functions"),
        ("inclusive", "inclusive time, all functions"),
    ):
        lines.append(f"  {title}:")
        for frame, pct in summary[key][:top]:
            lines.append(f"    {pct:6.2f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="file written by py-spy record --format raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    summary = summarize(args.raw, top=max(args.top, 40))
    print(f"{summary['samples']} samples")
    print(format_summary(summary, top=args.top))


if __name__ == "__main__":
    main()
