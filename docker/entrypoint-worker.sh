#!/usr/bin/env bash
# Worker entrypoint: CANN's environment when the image has it, then the given command.
set -euo pipefail
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
  # shellcheck disable=SC1091
  source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
exec "$@"
