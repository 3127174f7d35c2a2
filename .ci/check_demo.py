"""CI: fail when `make demo` did not reach its held-out in-domain gain.

Reads the gain the demo itself wrote (``gain_points`` in its ``demo_results.json``), so CI
checks the README's first command and not a re-implementation of it.

    python .ci/check_demo.py outputs/smollm2-135m-otr-lora/demo_results.json 15
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    path, floor = Path(argv[0]), float(argv[1])
    if not path.is_file():
        print(f"check_demo: {path} is missing: `make demo` did not finish", file=sys.stderr)
        return 1
    result = json.loads(path.read_text())
    gain = result["gain_points"]["in_domain"]
    base = result["base"]["in_domain"]["accuracy"]
    after = result["after"]["in_domain"]["accuracy"]
    verdict = "ok" if gain >= floor else "FAILED"
    print(
        f"check_demo: {verdict}: held-out in-domain {base:.3f} -> {after:.3f} "
        f"({gain:+.1f} points; floor {floor:g}), demo {result.get('demo_seconds', '?')} s"
    )
    return 0 if gain >= floor else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
