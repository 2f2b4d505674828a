# kvfleet-controlplane %post ($1: 1 on install, 2 on upgrade): its own 0750 directory (on an
# upgrade from the shared kvfleet user, the CA sealing key and the admin token file move into it,
# and the database role is mapped to kvfleet-cp), then the unit is enabled on install but not
# started, since the service needs /etc/kvfleet/controlplane.toml first.
install -d -o root -g root -m 0755 /var/lib/kvfleet
install -d -o kvfleet-cp -g kvfleet-cp -m 0750 /var/lib/kvfleet/controlplane
for pair in controlplane-ca.key:ca.key controlplane-admin-token:admin-token; do
    old="/var/lib/kvfleet/${pair%%:*}"
    new="/var/lib/kvfleet/controlplane/${pair#*:}"
    if [ -f "$old" ] && [ ! -L "$old" ] && [ ! -e "$new" ]; then
        mv "$old" "$new"
        ln -s "controlplane/${pair#*:}" "$old"
    fi
    if [ -f "$new" ] && [ "$(stat -c %U "$new")" != kvfleet-cp ]; then
        chown kvfleet-cp:kvfleet-cp "$new"
    fi
done
/usr/lib/kvfleet/pg-peer-map || :
if [ "$1" -eq 1 ]; then
    systemctl enable kvfleet-controlplane.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
