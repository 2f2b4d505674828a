# kvfleet-agent %post ($1: 1 on install, 2 on upgrade): directories (the agent's own, 0750; what an
# older version left to the shared kvfleet user moves to kvfleet-agent), then the unit is enabled
# on install but not started, since the service needs /etc/kvfleet/agent.toml first.
install -d -o root -g root -m 0755 /var/lib/kvfleet
install -d -o kvfleet-agent -g kvfleet-agent -m 0750 /var/lib/kvfleet/agent /var/cache/kvfleet
for d in /var/lib/kvfleet/agent /var/cache/kvfleet /var/lib/kvfleet/models; do
    if [ -d "$d" ] && [ "$(stat -c %U "$d")" = kvfleet ]; then
        chown -R kvfleet-agent:kvfleet-agent "$d"
    fi
done
if [ -e /etc/kvfleet/join-token ] && [ "$(stat -c %G /etc/kvfleet/join-token)" = kvfleet ]; then
    chgrp kvfleet-agent /etc/kvfleet/join-token
fi
if [ "$1" -eq 1 ]; then
    systemctl enable kvfleet-agent.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
