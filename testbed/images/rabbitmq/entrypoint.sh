#!/bin/sh
# Entrypoint of the test bed's RabbitMQ image (EVALUATION ONLY). What the official image's
# entrypoint does that deploy/rabbitmq/statefulset.yaml relies on, and no more:
#  - RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS become default_user / default_pass (the user
#    RabbitMQ creates on its first boot). /etc/rabbitmq/conf.d is a read-only ConfigMap, so its
#    *.conf files are copied with that file into a directory on the data volume, and
#    RABBITMQ_CONFIG_FILES names that directory (files are read in name order).
#  - RABBITMQ_ENABLED_PLUGINS_FILE is read by rabbitmq-server itself.
#  - exec: RabbitMQ's own rabbitmq-server script replaces this shell; it is PID 1, traps SIGTERM
#    and stops the node. (Debian's /usr/sbin/rabbitmq-server wrapper would neither exec nor log
#    to stdout: it sends the output to /var/log/rabbitmq/startup_log.)
set -eu

conf_dir=${EQTB_RABBITMQ_CONF_DIR:-/var/lib/rabbitmq/eqtb-conf.d}
rm -rf "$conf_dir"
mkdir -p "$conf_dir"
for conf in /etc/rabbitmq/conf.d/*.conf; do
  if [ -e "$conf" ]; then cp "$conf" "$conf_dir/"; fi
done

if [ -n "${RABBITMQ_DEFAULT_USER:-}${RABBITMQ_DEFAULT_PASS:-}" ]; then
  if [ -z "${RABBITMQ_DEFAULT_USER:-}" ] || [ -z "${RABBITMQ_DEFAULT_PASS:-}" ]; then
    echo "set both RABBITMQ_DEFAULT_USER and RABBITMQ_DEFAULT_PASS, or neither" >&2
    exit 64
  fi
  (
    umask 077
    printf 'default_user = %s\ndefault_pass = %s\n' "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" \
      >"$conf_dir/zz-eqtb-default-user.conf"
  )
fi
export RABBITMQ_CONFIG_FILES="$conf_dir"

cd /var/lib/rabbitmq
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
