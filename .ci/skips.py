"""Read the test suite's report (written by tests/skipreport.py): print how many tests ran and
skipped, and why; exit 1 when one skipped for any reason but the `gpu` marker, or no report
came (the suite did not run to its end). Standard library only."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def main(path: str) -> int:
    file = Path(path)
    if not file.is_file() or not file.read_text(encoding="utf-8").strip():
        print(f"ci: error: no test report in {path}; did pytest run to its end?", file=sys.stderr)
        return 1
    r = json.loads(file.read_text(encoding="utf-8"))
    skips = r["skipped"]
    gpu = [s for s in skips if s["gpu"]]
    other = [s for s in skips if not s["gpu"]]
    print(
        f"ci: {r['passed']} passed, {r['failed']} failed, {r['error']} errors, "
        f"{len(skips)} skipped ({len(gpu)} for the gpu marker, {len(other)} for other "
        f"reasons), {r['deselected']} deselected (slow)"
    )
    for reason, n in sorted(Counter(s["reason"] for s in gpu).items()):
        print(f"ci:   {n} skipped (gpu): {reason}")
    for s in other:
        print(f"ci:   skipped: {s['test']}: {s['reason']}")
    if other:
        print(
            f"ci: error: {len(other)} tests skipped for another reason than the gpu marker; "
            "the suite must run everything but GPU checks",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
