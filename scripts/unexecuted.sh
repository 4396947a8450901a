#!/usr/bin/env bash
# The mutants that survive for certain: those on lines that no test of the mutation script's
# set ever executes. One instrumented build and one run of that set (about 7 minutes here)
# instead of a build and a test run per mutant (hours for the ~2,500 of the store, the engine
# and the providers), so it finds the untested code of a whole module at once; what it cannot
# find are lines that run without any test checking their result (scripts/mutants.sh finds
# those).
#
#   scripts/unexecuted.sh                              # src/store/ src/engine/ src/providers/ src/retry.rs
#   scripts/unexecuted.sh src/store/pg/ src/retry.rs   # these files and folders
#
# Prints the count per file and writes the list (cargo-mutants' names) to
# target/unexecuted/mutants.txt. The test set is the one `.cargo/mutants.toml` gives
# cargo-mutants, so the two tools agree on what "tested" means.
#
# Needs cargo-llvm-cov and cargo-mutants (`cargo install --locked cargo-llvm-cov cargo-mutants`)
# and llvm-cov/llvm-profdata of the LLVM version rustc uses (`rustc -vV`): rustup's
# llvm-tools-preview, or Debian's llvm-N package (`apt-get install llvm-22` for LLVM 22).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in cargo-llvm-cov cargo-mutants; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$tool is not installed: cargo install --locked $tool" >&2
        exit 2
    fi
done
if [ -z "${LLVM_COV:-}" ] || [ -z "${LLVM_PROFDATA:-}" ]; then
    major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    if [ -x "/usr/lib/llvm-$major/bin/llvm-cov" ]; then
        export LLVM_COV="/usr/lib/llvm-$major/bin/llvm-cov"
        export LLVM_PROFDATA="/usr/lib/llvm-$major/bin/llvm-profdata"
    elif ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
        echo "no llvm-cov for LLVM $major: apt-get install llvm-$major, or rustup component add llvm-tools-preview (or set LLVM_COV and LLVM_PROFDATA)" >&2
        exit 2
    fi
fi

paths=("$@")
if [ "${#paths[@]}" -eq 0 ]; then
    paths=(src/store/ src/engine/ src/providers/ src/retry.rs)
fi
files=()
for p in "${paths[@]}"; do
    if [ -d "$p" ]; then
        while IFS= read -r f; do files+=("$f"); done < <(find "$p" -name '*.rs' | sort)
    else
        files+=("$p")
    fi
done
args=()
for f in "${files[@]}"; do
    case "$f" in
        */tests.rs | */tests/*) ;;
        *) args+=(--file "$f") ;;
    esac
done

out=target/unexecuted
mkdir -p "$out"
# The test set: `additional_cargo_args` of .cargo/mutants.toml, read rather than repeated.
mapfile -t set < <(python3 -c '
import tomllib
with open(".cargo/mutants.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["additional_cargo_args"]))
')
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_DEV_DEBUG=0
export OMNIFLOW_TEST_PG="${OMNIFLOW_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}"
# A failing test still counts the lines it ran; the test binaries pass LLVM_PROFILE_FILE on to
# the `omniflow` processes they start, so those count too.
cargo llvm-cov nextest --lcov --output-path "$out/lcov.info" --ignore-run-fail "${set[@]}"
cargo mutants --list --json "${args[@]}" > "$out/mutants.json"

python3 - "$out" <<'EOF'
import collections, json, os, sys

out = sys.argv[1]
root = os.getcwd()
hits = collections.defaultdict(dict)
current = None
with open(os.path.join(out, "lcov.info")) as f:
    for line in f:
        line = line.strip()
        if line.startswith("SF:"):
            current = os.path.relpath(line[3:], root)
        elif line.startswith("DA:"):
            n, count = line[3:].split(",")[:2]
            n = int(n)
            hits[current][n] = max(hits[current].get(n, 0), int(count))

with open(os.path.join(out, "mutants.json")) as f:
    mutants = json.load(f)
total = collections.Counter()
unexecuted = collections.Counter()
listed = []
for m in mutants:
    path = m["file"]
    lines = hits.get(path, {})
    start, end = m["span"]["start"]["line"], m["span"]["end"]["line"]
    counts = [lines[i] for i in range(start, end + 1) if i in lines]
    if not counts:
        # No counted line in the span (a match arm's pattern, say): the closest line above.
        k = start
        while k > 0 and k not in lines:
            k -= 1
        counts = [lines[k]] if k > 0 else []
    total[path] += 1
    if counts and max(counts) == 0:
        unexecuted[path] += 1
        listed.append(m["name"])

with open(os.path.join(out, "mutants.txt"), "w") as f:
    f.write("".join(line + "\n" for line in listed))
print(f"{sum(unexecuted.values())} of {sum(total.values())} mutants are on lines no test of the set executes")
for path, n in sorted(unexecuted.items(), key=lambda kv: (-kv[1], kv[0])):
    print(f"{n:5} of {total[path]:4}  {path}")
print(f"list: {out}/mutants.txt")
EOF
