# kvfleet-agent %preun ($1: 0 on erase, 1 on upgrade): on erase the unit is stopped and disabled.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable kvfleet-agent.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop kvfleet-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
