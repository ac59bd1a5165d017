# Source this file to use the project's venv and podman settings in a shell:
#   source scripts/env.sh
_smtpgw_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$_smtpgw_root/.venv/bin:$PATH"
export CONTAINERS_CONF="$_smtpgw_root/.lab/containers.conf"
export ANSIBLE_CONFIG="$_smtpgw_root/ansible.cfg"
# The checkout as the collection smtpgw.gateway, on the collections path ansible.cfg names.
mkdir -p "$_smtpgw_root/.lab/collections/ansible_collections/smtpgw"
ln -sfn ../../../.. "$_smtpgw_root/.lab/collections/ansible_collections/smtpgw/gateway"
unset _smtpgw_root
