# kvfleet-controlplane %pre: the kvfleet system user exists before the files land (the config file belongs
# to its group). Keep in step with packaging/deb/kvfleet-controlplane/postinst.
getent group kvfleet >/dev/null || groupadd --system kvfleet
getent passwd kvfleet >/dev/null || useradd --system --gid kvfleet --no-create-home \
    --home-dir /var/lib/kvfleet --shell /usr/sbin/nologin --comment "kvfleet services" kvfleet
exit 0
