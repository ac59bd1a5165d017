# Source this file to use the project's venv and podman settings in a shell:
#   source scripts/env.sh
_smtpgw_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$_smtpgw_root/.venv/bin:$PATH"
export CONTAINERS_CONF="$_smtpgw_root/.lab/containers.conf"
export ANSIBLE_CONFIG="$_smtpgw_root/ansible.cfg"
unset _smtpgw_root
