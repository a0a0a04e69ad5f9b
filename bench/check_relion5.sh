#!/usr/bin/env bash
# check_relion5.sh - does RELION 5 read cryomag's output STAR files and keep its extra columns?
#
# What it checks
#   1. `cryomag simulate` writes a small data set (default 300 particles, box 64) and
#      `cryomag estimate --fit scale,aniso,particle,micrograph,defocus` writes
#      est/particles.star with cryomag's per-particle columns (all named cmag*:
#      cmagScale, cmagParticleMag, cmagParticleMagRaw, cmagParticleMagError,
#      cmagParticleMagMat00..11, cmagMicrographMag..., cmagDefocusMag, ...).
#   2. RELION's relion_star_handler reads that file and writes it back
#        a. `--select rlnDefocusU --minval 0 --maxval 1e9` (selects every row),
#        b. `--split --nr_split 2`, then `--combine` of the two halves (--combine drops
#           RELION's rlnGroupNumber on purpose; that one column is allowed to go),
#      and every output must hold every row and every column of the input:
#        - cmag* columns: the same values (relative difference <= 1e-6; RELION keeps labels it
#          does not know as the text it read, so they come back identical),
#        - RELION's own columns: the same values up to RELION's print format (it writes a
#          double as %12.6f, %12.5f when negative, %12.6e / %12.5e below 1e-3 or above 1e5), i.e.
#          each value must equal the input value printed that way,
#        - text and integer columns: identical; the same number of rows, in the same order.
#      Columns RELION adds are listed, not counted as errors.
#   3. relion_reconstruct --ctf runs on est/particles.star (from est/, since cryomag writes image
#      paths relative to the STAR file and RELION reads them relative to the working folder)
#      and writes a finite map; its correlation with the simulated reference is printed.
#   4. If the real test files are there (CRYOMAG_DATA, default ../shared/data next to the repo),
#      steps 1-3 again on particles/relion31.star with map/emd_6824.mrc (reconstruct from a
#      staging folder in which the STAR's image paths are links to relion31.mrcs).
#   RELION's messages about labels it does not know ("will ignore (but maintain) values for the
#   unknown label ...") are counted and shown; they are expected and are not errors.
#
# RELION 5 is needed (tested with 5.0.1, built with GUI=OFF CUDA=OFF ALTCPU=OFF; only the
# targets star_handler and reconstruct are used). It is NOT a CI dependency of cryomag: this
# script is run by hand; tests/test_relion5_compat.py (marked slow, skipped unless RELION5_BIN is
# set) covers the star_handler part inside pytest.
#
# Usage
#   RELION_BIN=/path/to/relion5/build/bin bench/check_relion5.sh [WORKDIR]
# Environment
#   RELION_BIN     folder holding relion_star_handler and relion_reconstruct of RELION 5
#                  (required unless those on PATH are RELION 5; an older RELION is refused)
#   CRYOMAG        cryomag executable (default: cryomag on PATH)
#   PYTHON         Python with cryomag importable (default: the python beside $CRYOMAG)
#   CRYOMAG_DATA   real test files (default: <repo>/../shared/data); skipped if absent
#   N_PARTICLES, BOX, SEED   simulation size (default 300, 64, 1)
# WORKDIR (default: a new temporary folder) must be empty or absent; it is kept afterwards.
# Exit status: 0 all checks passed, 1 a mismatch or a failed RELION run, 2 set-up problem.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
die() { echo "check_relion5: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------- set-up --
if [[ -n "${RELION_BIN:-}" ]]; then
    star_handler="$RELION_BIN/relion_star_handler"
    reconstruct="$RELION_BIN/relion_reconstruct"
else
    star_handler=$(command -v relion_star_handler || true)
    reconstruct=$(command -v relion_reconstruct || true)
fi
[[ -x "$star_handler" ]] || die "relion_star_handler not found; set RELION_BIN"
[[ -x "$reconstruct" ]] || die "relion_reconstruct not found; set RELION_BIN"
version=$("$star_handler" --version 2>&1 | head -n 1 || true)
[[ "$version" == *"version: 5."* ]] || die "need RELION 5, $star_handler says: $version"

CRYOMAG=${CRYOMAG:-$(command -v cryomag || true)}
[[ -x "$CRYOMAG" ]] || die "cryomag not found; set CRYOMAG"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(dirname "$CRYOMAG")/python
    [[ -x "$PYTHON" ]] || PYTHON=python3
fi
"$PYTHON" -c "import cryomag" 2>/dev/null || die "$PYTHON cannot import cryomag; set PYTHON"
DATA=${CRYOMAG_DATA:-$(dirname "$repo")/shared/data}
N_PARTICLES=${N_PARTICLES:-300}
BOX=${BOX:-64}
SEED=${SEED:-1}

work=${1:-$(mktemp -d -t cryomag-relion5.XXXXXX)}
mkdir -p "$work"
[[ -z "$(ls -A "$work")" ]] || die "$work is not empty"
work=$(cd "$work" && pwd)
echo "RELION:  $version ($star_handler)"
echo "cryomag: $CRYOMAG"
echo "work:    $work"

# The comparison: python compare.py INPUT.star OUTPUT.star [LABEL...] -> exit 1 on any
# mismatch; the LABELs (RELION's own) may be missing from OUTPUT.
cat >"$work/compare.py" <<'EOF'
import sys

import numpy as np

from cryomag.io import read_star_blocks


def relion_text(v):
    """v as RELION 5 prints a double label (MetaDataTable::getValueToString, 12 characters)."""
    if (0.0 < abs(v) < 0.001) or abs(v) > 100000.0:
        s = f"{v:12.5e}" if v < 0 else f"{v:12.6e}"
    else:
        s = f"{v:12.5f}" if v < 0 else f"{v:12.6f}"
    return s[:12]


def numeric(col):
    try:
        return np.asarray(col, dtype=float)
    except (TypeError, ValueError):
        return None


def compare(fin, fout, may_drop=()):
    _, a_blocks, _ = read_star_blocks(fin)
    _, b_blocks, _ = read_star_blocks(fout)
    bad = []
    for name, a in a_blocks.items():
        if name not in b_blocks:
            bad.append(f"block data_{name} missing")
            continue
        b = b_blocks[name]
        lost = [c for c in a.columns if c not in b.columns and c not in may_drop]
        dropped = [c for c in a.columns if c not in b.columns and c in may_drop]
        added = [c for c in b.columns if c not in a.columns]
        cm_a = [c for c in a.columns if c.startswith("cmag")]
        cm_b = [c for c in b.columns if c.startswith("cmag")]
        print(
            f"  data_{name}: rows {len(a)} -> {len(b)}, columns {a.shape[1]} -> {b.shape[1]}"
            f" (cmag {len(cm_a)} -> {len(cm_b)})"
        )
        if lost:
            bad.append(f"data_{name}: columns lost: {' '.join(lost)}")
        if dropped:
            print(f"    columns RELION drops on purpose (not an error): {' '.join(dropped)}")
        if added:
            print(f"    columns added by RELION (not an error): {' '.join(added)}")
        if len(a) != len(b):
            bad.append(f"data_{name}: {len(a)} rows in, {len(b)} out")
            continue
        worst = {"cmag": (0.0, ""), "other": (0.0, "")}
        reformatted = 0
        for c in a.columns:
            if c not in b.columns:
                continue
            x, y = numeric(a[c]), numeric(b[c])
            if x is None or y is None:
                diff = int(np.sum(a[c].astype(str).to_numpy() != b[c].astype(str).to_numpy()))
                if diff:
                    bad.append(f"data_{name}/{c}: {diff} text values differ")
                continue
            if not np.array_equal(np.isnan(x), np.isnan(y)):
                bad.append(f"data_{name}/{c}: NaN in different rows")
                continue
            ok = ~np.isnan(x)
            x, y = x[ok], y[ok]
            rel = np.abs(y - x) / np.maximum(np.abs(x), 1e-300)
            rel[y == x] = 0.0
            m = float(rel.max()) if rel.size else 0.0
            kind = "cmag" if c.startswith("cmag") else "other"
            if m >= worst[kind][0]:
                worst[kind] = (m, c)
            if kind == "cmag":
                if m > 1e-6:
                    bad.append(f"data_{name}/{c}: relative difference {m:.3g} > 1e-6")
            else:
                differ = np.nonzero(y != x)[0]
                reformatted += differ.size
                for i in differ:
                    if float(relion_text(x[i])) != y[i]:
                        bad.append(
                            f"data_{name}/{c} row {i}: {x[i]!r} -> {y[i]!r},"
                            f" not RELION's print format of the input ({relion_text(x[i])})"
                        )
                        break
        for kind, (m, c) in worst.items():
            if c:
                print(f"    max relative difference, {kind} columns: {m:.3g} ({c})")
        if reformatted:
            print(f"    {reformatted} RELION-label values rewritten in RELION's print format")
    for msg in bad:
        print("  MISMATCH", msg)
    return not bad


sys.exit(0 if compare(sys.argv[1], sys.argv[2], sys.argv[3:]) else 1)
EOF

# Correlation of a reconstruction with a reference map (both MRC, same box), printed.
cat >"$work/mapcheck.py" <<'EOF'
import sys

import numpy as np

from cryomag.io import read_map

rec = np.asarray(read_map(sys.argv[1])[0], dtype=float)
if not np.all(np.isfinite(rec)) or not np.any(rec):
    print("  MISMATCH reconstruction is not finite or all zero")
    sys.exit(1)
msg = f"  reconstruction {rec.shape}, finite"
if len(sys.argv) > 2:
    ref = np.asarray(read_map(sys.argv[2])[0], dtype=float)
    o = (ref.shape[0] - rec.shape[0]) // 2  # centre box of the (larger) reference
    if o >= 0:
        n = rec.shape[0]
        cc = np.corrcoef(rec.ravel(), ref[o : o + n, o : o + n, o : o + n].ravel())[0, 1]
        msg += f", correlation with the reference {cc:.3f}"
print(msg)
EOF

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# run_relion LOG CMD...: run, keep stdout+stderr in LOG, report unknown-label warnings.
run_relion() {
    local log=$1
    shift
    echo "+ $*" | sed "s|$work/||g"
    if ! "$@" >"$log" 2>&1; then
        tail -n 20 "$log"
        return 1
    fi
    local n
    n=$(grep -c "unknown label" "$log" || true)
    if [[ $n -gt 0 ]]; then
        echo "  RELION: $n 'unknown label' messages, e.g.: $(grep -m 1 "unknown label" "$log")"
        echo "  labels: $(grep -o "unknown label: *[A-Za-z0-9_]*" "$log" | awk '{print $NF}' \
            | sort -u | tr '\n' ' ')"
    fi
    if grep -q "ERROR" "$log"; then grep -A 2 "ERROR" "$log" | head -n 6; fi
}

# round_trips DIR STAR: star_handler copies of STAR in DIR, each compared with STAR.
round_trips() {
    local d=$1 star=$2
    echo "-- relion_star_handler --select (all rows)"
    if run_relion "$d/select.log" "$star_handler" --i "$star" --o "$d/select.star" \
        --select rlnDefocusU --minval 0 --maxval 1e9; then
        "$PYTHON" "$work/compare.py" "$star" "$d/select.star" || fail "$d/select.star differs"
    else
        fail "relion_star_handler --select on $star"
    fi
    echo "-- relion_star_handler --split --nr_split 2, then --combine"
    if run_relion "$d/split.log" "$star_handler" --i "$star" --o "$d/split.star" \
        --split --nr_split 2; then
        local halves
        halves=$(ls "$d"/split_split*.star | sort | tr '\n' ' ')
        echo "  halves: $(for f in $halves; do echo -n "$(basename "$f") "; done)"
        for f in $halves; do
            echo "  $(basename "$f"): cmag columns $(grep -c '^_cmag' "$f")"
        done
        if run_relion "$d/combine.log" "$star_handler" --combine --i "${halves% }" \
            --o "$d/combined.star"; then
            # --combine removes rlnGroupNumber on purpose (star_handler.cpp: the numbers of
            # different files would clash)
            "$PYTHON" "$work/compare.py" "$star" "$d/combined.star" rlnGroupNumber \
                || fail "$d/combined.star differs"
        else
            fail "relion_star_handler --combine"
        fi
    else
        fail "relion_star_handler --split on $star"
    fi
}

# ------------------------------------------------------------------- simulated data set --
sim=$work/sim
est=$work/est
echo "== simulate $N_PARTICLES particles, box $BOX; estimate with local fits"
"$CRYOMAG" simulate --out "$sim" --n-particles "$N_PARTICLES" --box "$BOX" --apix 1.3 \
    --snr 1.0 --seed "$SEED" --aniso 1.01,0.99,30 --kappa 1.0 --mic-scatter 0.5 \
    --particle-scatter 0.5 --workers 1 --quiet
"$CRYOMAG" estimate --particles "$sim/particles.star" --ref "$sim/ref.mrc" --out "$est" \
    --fit scale,aniso,particle,micrograph,defocus --j 1 --no-plots -q >"$work/estimate.log" 2>&1 \
    || { tail -n 20 "$work/estimate.log"; die "cryomag estimate failed"; }
ncmag=$(grep -c '^_cmag' "$est/particles.star" || true)
echo "  est/particles.star: $ncmag cmag columns: $(grep '^_cmag' "$est/particles.star" \
    | awk '{print $1}' | tr -d _ | tr '\n' ' ')"
[[ $ncmag -gt 0 ]] || fail "cryomag wrote no cmag columns"
mkdir -p "$work/relion"
round_trips "$work/relion" "$est/particles.star"
echo "-- relion_reconstruct --ctf (from est/)"
if (cd "$est" && run_relion "$work/relion/reconstruct.log" "$reconstruct" \
    --i particles.star --o "$work/relion/rec.mrc" --ctf); then
    "$PYTHON" "$work/mapcheck.py" "$work/relion/rec.mrc" "$sim/ref.mrc" \
        || fail "reconstruction from est/particles.star"
else
    fail "relion_reconstruct on est/particles.star"
fi
echo "-- for comparison: relion_reconstruct --ctf on the simulation's own sim/particles.star"
if (cd "$sim" && run_relion "$work/relion/reconstruct_sim.log" "$reconstruct" \
    --i particles.star --o "$work/relion/rec_sim.mrc" --ctf); then
    "$PYTHON" "$work/mapcheck.py" "$work/relion/rec_sim.mrc" "$sim/ref.mrc" || true
fi

# ------------------------------------------------------------------------ real test file --
if [[ -f "$DATA/particles/relion31.star" && -f "$DATA/map/emd_6824.mrc" ]]; then
    echo "== real file: $DATA/particles/relion31.star with map/emd_6824.mrc"
    real=$work/real_est
    if "$CRYOMAG" estimate --particles "$DATA/particles/relion31.star" \
        --ref "$DATA/map/emd_6824.mrc" --out "$real" \
        --fit scale,aniso,particle,micrograph,defocus --j 1 --no-plots -q \
        >"$work/real_estimate.log" 2>&1; then
        echo "  real_est/particles.star: $(grep -c '^_cmag' "$real/particles.star" || true)" \
            "cmag columns"
        mkdir -p "$work/relion_real"
        round_trips "$work/relion_real" "$real/particles.star"
        # RELION reads image paths as written; link the STAR's stack names to the real stack.
        stage=$work/relion_real/stage
        mkdir -p "$stage"
        "$PYTHON" - "$real/particles.star" "$DATA/particles/relion31.mrcs" "$stage" <<'EOF'
import os
import sys
from pathlib import Path

from cryomag.io import read_star_blocks

_, blocks, _ = read_star_blocks(sys.argv[1])
for stack in sorted({n.split("@", 1)[1] for n in blocks["particles"]["rlnImageName"]}):
    link = Path(sys.argv[3]) / stack
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(sys.argv[2], link)
EOF
        echo "-- relion_reconstruct --ctf on the real file (5 particles, box 256)"
        if (cd "$stage" && run_relion "$work/relion_real/reconstruct.log" "$reconstruct" \
            --i "$real/particles.star" --o "$work/relion_real/rec.mrc" --ctf); then
            "$PYTHON" "$work/mapcheck.py" "$work/relion_real/rec.mrc" \
                || fail "reconstruction from real_est/particles.star"
        else
            fail "relion_reconstruct on real_est/particles.star"
        fi
    else
        tail -n 20 "$work/real_estimate.log"
        fail "cryomag estimate on the real file"
    fi
else
    echo "== real file skipped: $DATA/particles/relion31.star not found"
fi

echo
if [[ $failures -gt 0 ]]; then
    echo "check_relion5: $failures check(s) FAILED (work folder $work)"
    exit 1
fi
echo "check_relion5: all checks passed ($version; work folder $work)"
