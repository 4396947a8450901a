#!/usr/bin/env bash
# Mutation testing with cargo-mutants: change the code in small ways (a `==` becomes `!=`, a
# function returns a default) and check that some test fails for each change. A mutant that
# survives is behaviour no test pins down.
#
#   scripts/mutants.sh                  # the .rs files under src/ changed since main
#   scripts/mutants.sh src/store/       # every file under these paths
#   scripts/mutants.sh src/retry.rs src/store/transitions.rs
#   scripts/mutants.sh src/store/ -- --in-place    # options after -- go to cargo-mutants
#
# Too slow for CI on 2 cores (each mutant is a build and a test run): run it before asking for
# review of a change to the store, the engine or the providers. The tests it runs are the unit
# tests and the store, engine and provider integration tests (`.cargo/mutants.toml`), which is
# where those modules' behaviour is pinned. Results land in mutants.out/ (missed.txt: the
# survivors). Kill a survivor with a test, or, if it is truly equivalent (no behaviour changes),
# add it to exclude_re in .cargo/mutants.toml with the reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
    echo "cargo-mutants is not installed: cargo install --locked cargo-mutants" >&2
    exit 2
fi

files=()
paths=()
extra=()
while [ "$#" -gt 0 ]; do
    if [ "$1" = "--" ]; then
        shift
        extra=("$@")
        break
    fi
    paths+=("$1")
    shift
done
if [ "${#paths[@]}" -gt 0 ]; then
    for p in "${paths[@]}"; do
        if [ -d "$p" ]; then
            while IFS= read -r f; do files+=("$f"); done < <(find "$p" -name '*.rs' | sort)
        else
            files+=("$p")
        fi
    done
else
    base=$(git merge-base HEAD main 2>/dev/null || echo main)
    while IFS= read -r f; do files+=("$f"); done \
        < <(git diff --name-only "$base" -- 'src/*.rs' 'src/**/*.rs' | sort -u)
fi
# Test modules and test helpers are not mutated.
kept=()
for f in "${files[@]}"; do
    case "$f" in
        */tests.rs | */tests/* | */testing.rs) ;;
        *) [ -f "$f" ] && kept+=("$f") ;;
    esac
done
if [ "${#kept[@]}" -eq 0 ]; then
    echo "no Rust source changed since main: nothing to mutate (name files or folders to test them)"
    exit 0
fi

# Without debug info a mutant's build links in seconds (the test binaries are ~5x smaller);
# the first build in a fresh target directory is a full one (about 2 minutes here).
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_DEV_DEBUG=0
# The store's and the fleet's PostgreSQL tests skip without a server; a skipped test catches
# nothing, so point them at the local one unless told otherwise.
export OMNIFLOW_TEST_PG="${OMNIFLOW_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}"

args=()
for f in "${kept[@]}"; do args+=(--file "$f"); done
echo "mutating ${#kept[@]} file(s): ${kept[*]}"

# A test process killed at a mutant's timeout or by nextest's fail-fast leaves the omniflow
# processes it spawned behind (daemons, mostly), adopted by init; left running they load the
# machine and slow, or time out, every later mutant. Reap those of this run's builds while it
# runs: cargo-mutants' scratch copies, or this tree itself with --in-place. The reaper stops
# with the script, however it ends.
scratch="${TMPDIR:-/tmp}"
export MUTANTS_REAP_SCRATCH="${scratch%/}/cargo-mutants-" MUTANTS_REAP_HERE=""
for a in "${extra[@]}"; do
    if [ "$a" = "--in-place" ]; then MUTANTS_REAP_HERE="$(pwd)/target/debug/omniflow"; fi
done
(
    while kill -0 $$ 2>/dev/null && sleep 5; do
        ps -eo pid=,ppid=,args= |
            awk '$2 == 1 {
                b = $3; s = ENVIRON["MUTANTS_REAP_SCRATCH"]; h = ENVIRON["MUTANTS_REAP_HERE"]
                if ((index(b, s) == 1 && b ~ /\/target\/debug\/omniflow$/) || (h != "" && b == h))
                    print $1
            }' |
            xargs -r kill -9 2>/dev/null || true
    done
) &
reaper=$!
trap 'kill "$reaper" 2>/dev/null' EXIT
cargo mutants "${args[@]}" "${extra[@]}"
