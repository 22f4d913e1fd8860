#!/usr/bin/env bash
# The layers of src/ (CONTRIBUTING.md): at most 12 top-level modules, none
# naming another that names it back (directly or round a loop), no file over
# 1,000 lines of code. scripts/layers.py is the workplace's rule, copied
# (../shared/tools/layers.py is run too where it is present, in case it
# changed). The rule reads `crate::` paths in code, and stops reading a file
# at its first `#[cfg(test)]`; this script refuses the ways around that:
#   - grouped `use crate::{...}` (the rule sees no module in it),
#   - `super::super::` (a path across a stage the rule does not see),
#   - code after a file's first `#[cfg(test)]` that is not itself test code
#     (a test-only item in the middle of a file would hide what follows),
#   - a `tests.rs` whose parent does not declare it `#[cfg(test)] mod tests;`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/layers.py
if [ -f ../shared/tools/layers.py ] && ! cmp -s ../shared/tools/layers.py scripts/layers.py; then
  python3 ../shared/tools/layers.py
fi
python3 - <<'PY'
import os, re, sys
bad = []
item = re.compile(r"^(pub(\([^)]*\))? )?(async )?(fn|impl|mod|struct|enum|const|static|use|type|trait|macro_rules!)\b")
for d, _, fs in os.walk("src"):
    for f in fs:
        if not f.endswith(".rs"):
            continue
        p = os.path.join(d, f)
        lines = open(p, encoding="utf-8").read().split("\n")
        for i, l in enumerate(lines, 1):
            if re.search(r"use crate::\{|super::super::", l) and not l.lstrip().startswith("//"):
                bad.append(f"{p}:{i}: a path the layer rule cannot see: {l.strip()}")
        if f == "tests.rs":
            parent = os.path.join(d, "mod.rs")
            text = open(parent, encoding="utf-8").read() if os.path.exists(parent) else ""
            if not re.search(r"#\[cfg\(test\)\]\s*mod tests;", text):
                bad.append(f"{p}: its parent does not declare `#[cfg(test)] mod tests;`")
            continue
        first = next((i for i, l in enumerate(lines) if l.strip().startswith("#[cfg(test)]")), None)
        if first is None:
            continue
        # Every top-level item after the first #[cfg(test)] is test code.
        for i in range(first, len(lines)):
            if not item.match(lines[i]):
                continue
            j = i - 1
            while j >= 0 and (lines[j].startswith("#[") or lines[j].startswith("///")):
                if lines[j].startswith("#[cfg(test)]"):
                    break
                j -= 1
            if j < 0 or not lines[j].startswith("#[cfg(test)]"):
                bad.append(f"{p}:{i + 1}: code after the file's first #[cfg(test)] (at line {first + 1}), hidden from the layer rule")
for b in bad:
    print(b)
if bad:
    sys.exit(f"check-layers: {len(bad)} problem(s)")
print("check-layers: no path around the rule")
PY
