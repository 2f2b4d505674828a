# kvfleet-agent %pre: the kvfleet system user exists before the files land (the config file belongs
# to its group). Keep in step with packaging/deb/kvfleet-agent/postinst.
getent group kvfleet >/dev/null || groupadd --system kvfleet
getent passwd kvfleet >/dev/null || useradd --system --gid kvfleet --no-create-home \
    --home-dir /var/lib/kvfleet --shell /usr/sbin/nologin --comment "kvfleet services" kvfleet
# GPU device nodes may belong to video (NVIDIA's NVreg_DeviceFileGID) or render (/dev/dri).
for group in video render; do
    if getent group "$group" >/dev/null; then usermod --append --groups "$group" kvfleet; fi
done
exit 0
