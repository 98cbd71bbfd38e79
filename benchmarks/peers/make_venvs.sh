#!/usr/bin/env bash
# Create one virtual environment per peer code, from PyPI, for the side-by-side benchmarks in benchmarks/peers/.
#
#   bash benchmarks/peers/make_venvs.sh [DIR] [PEER ...]     # DIR default: $SO3LIB_PEERS_DIR or ~/.cache/so3lib-peers
#   bash benchmarks/peers/make_venvs.sh ~/peers schnetpack apax
#
# Peers: schnetpack, so3krates-torch (PyTorch), apax, mlip (JAX). Each venv holds only that peer and what it
# pulls in, never so3lib or its dependencies. The torch venvs get torch==$TORCH_VERSION first (default 2.13.0):
# on the project's machines that pin takes a CPU wheel lying on local disk, whereas a plain "torch" requirement
# (asked for by the peer) would download a CUDA build of several GB. Set PEER_PYTHON to choose the interpreter.
# A log per peer is written to DIR/<peer>.log; the script goes on after a failure and prints a summary.
#
# SchnetPack 2.2.0 declares Requires-Python >= 3.12 while the local CPU torch wheel is for 3.11, and 2.1.1 (the
# newest release pip takes on 3.11) pins sympy<=1.12 against torch 2.13's sympy>=1.13.3, so pip would fall back
# to 2.0.4, which fails to import with torch 2.13. On Python < 3.12 the script therefore installs the 2.2.0 wheel
# alone with --ignore-requires-python, then its declared requirements resolved normally for this Python (its
# code imports and trains on 3.11).
set -u
DIR="${1:-${SO3LIB_PEERS_DIR:-$HOME/.cache/so3lib-peers}}"
shift || true
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(schnetpack so3krates-torch apax mlip)
PY="${PEER_PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
mkdir -p "$DIR"

pip_spec() {  # the PyPI requirement of each peer, and whether it needs torch
  case "$1" in
    schnetpack) echo "torch schnetpack==2.2.0" ;;
    so3krates-torch) echo "torch so3krates-torch" ;;
    apax) echo "jax apax" ;;
    mlip) echo "jax mlip" ;;
    *) echo "unknown" ;;
  esac
}

declare -A STATUS
for peer in "${PEERS[@]}"; do
  read -r kind pkg <<<"$(pip_spec "$peer")"
  if [ "$kind" = unknown ]; then
    echo "make_venvs: error: unknown peer '$peer' (known: schnetpack so3krates-torch apax mlip)" >&2
    exit 2
  fi
  venv="$DIR/$peer"
  log="$DIR/$peer.log"
  echo "== $peer -> $venv (log: $log)"
  (
    set -e
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip wheel
    if [ "$kind" = torch ]; then
      "$venv/bin/python" -m pip install "torch==$TORCH_VERSION"
      # keep the installed torch: the peer's own "torch" requirement is then already satisfied
      if [ "$peer" = schnetpack ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
        # the package alone past its Requires-Python, then its own requirements resolved for this Python
        "$venv/bin/python" -m pip install --no-deps --ignore-requires-python "$pkg"
        "$venv/bin/python" -c 'import importlib.metadata as m
print("\n".join(r for r in m.requires("schnetpack") if "extra ==" not in r))' >"$DIR/$peer.requirements.txt"
        "$venv/bin/python" -m pip install -r "$DIR/$peer.requirements.txt" "torch==$TORCH_VERSION"
      else
        "$venv/bin/python" -m pip install "$pkg" "torch==$TORCH_VERSION"
      fi
    else
      "$venv/bin/python" -m pip install "$pkg"
    fi
    "$venv/bin/python" -m pip install numpy  # the runners read the shared batches with numpy
    "$venv/bin/python" - "$pkg" <<'PY'
import importlib, importlib.metadata as md, sys
pkg = sys.argv[1].split("==")[0]
mod = {"so3krates-torch": "so3krates_torch"}.get(pkg, pkg)
importlib.import_module(mod)
print(f"import {mod} ok: {pkg} {md.version(pkg)}")
PY
  ) >"$log" 2>&1
  if [ $? -eq 0 ]; then
    STATUS[$peer]="ok ($(tail -n 1 "$log"))"
  else
    STATUS[$peer]="FAILED: $(grep -E 'ERROR|Error|error' "$log" | tail -n 1)"
  fi
  echo "   ${STATUS[$peer]}"
done
echo "== summary ($DIR)"
for peer in "${PEERS[@]}"; do echo "$peer: ${STATUS[$peer]}"; done
