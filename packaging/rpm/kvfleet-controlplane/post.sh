# kvfleet-controlplane %post ($1: 1 on install, 2 on upgrade): directories, then the unit is enabled on
# install but not started, since the service needs /etc/kvfleet/controlplane.toml first.
install -d -o kvfleet -g kvfleet -m 0750 /var/lib/kvfleet /var/cache/kvfleet /var/log/kvfleet
if [ "$1" -eq 1 ]; then
    systemctl enable kvfleet-controlplane.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
