#!/bin/sh
# /init of the Xen Dom0 of `armvm-build boot --xen` (busybox sh, Debian's Xen tools).
# Starts xenstored, xen-init-dom0 and xenconsoled, creates the DomU from /xen/domu.cfg
# with the image under test (the virtio disk whose serial is $IMAGE_SERIAL) as xvda, copies
# the DomU console to this console with a "[domu] " prefix, waits (bounded) for $GOAL in it,
# then ($AFTER=shutdown) asks the DomU to power off (xl shutdown, bounded by $POWEROFF_WAIT),
# removes it and powers the machine off. Lines for armvm-build: "ARMVM-XEN ...".
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
say() { echo "ARMVM-XEN $*"; }
end() {
    say "dom0-end $*"
    sync
    poweroff -f
    exec sh
}
. /etc/armvm-xen-dom0
. /xen/settings || end "result=error no /xen/settings"
# Xen's block hotplug script runs `stat /dev/stdin` (locking.sh): devtmpfs creates neither
# /dev/stdin nor /dev/fd, and without them the script loops until its 40 s timeout.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /run/lock
say "dom0-init kernel=$(uname -r) hypervisor=$(cat /sys/hypervisor/type 2>/dev/null || echo none)"
for m in $MODULES; do
    insmod "$m" || say "insmod $m failed"
done
mount -t xenfs xenfs /proc/xen || end "result=error cannot mount xenfs"
XB=/usr/lib/xen-$XEN_VERSION/bin
$XB/xenstored --pid-file=/run/xenstored.pid || end "result=error xenstored failed"
$XB/xen-init-dom0 || end "result=error xen-init-dom0 failed"
mkdir -p /var/log/xen/console
$XB/xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid \
    || end "result=error xenconsoled failed"
disk=
for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = "$IMAGE_SERIAL" ] && disk=/dev/${b##*/}
done
[ -b "$disk" ] || end "result=error the image disk (virtio serial $IMAGE_SERIAL) is missing"
# The DomU's vif has no bridge: libxl runs this hotplug script, which tells xen-netback
# the interface is ready, so the DomU's xen-netfront connects (nothing routes its traffic).
mkdir -p /etc/xen/scripts
cat > /etc/xen/scripts/armvm-vif <<'VIF'
#!/bin/sh
case "$1" in
    online|add) xenstore-write "$XENBUS_PATH/hotplug-status" connected ;;
esac
exit 0
VIF
chmod 755 /etc/xen/scripts/armvm-vif
say "dom0-ready image=$disk"
sed "s|@DISK@|$disk|" /xen/domu.cfg > /run/domu.cfg
# The DomU's PV console, and its emulated SBSA UART (vuart = "sbsa_uart": a guest firmware
# boot whose kernel writes to ttyAMA0) when it has one.
log=/var/log/xen/console/guest-$DOMU_NAME.log
vlog=/var/log/xen/console/guest-$DOMU_NAME-vuart0.log
for f in "$log" "$vlog"; do
    : > "$f"
    tail -n +1 -f "$f" 2>/dev/null | while IFS= read -r line; do echo "[domu] $line"; done &
done
xl create /run/domu.cfg || end "result=error xl create failed"
domid=$(xl domid "$DOMU_NAME" 2>/dev/null)
say "domu-created domid=$domid"
# Whether the DomU still runs: its xenstore folder (libxl removes it with the domain).
# xenstore-exists is small; xl (libxl and a dozen libraries) is far heavier for Dom0.
gone() {
    if [ -n "$domid" ]; then ! xenstore-exists "/local/domain/$domid" 2>/dev/null
    else ! xl domid "$DOMU_NAME" >/dev/null 2>&1; fi
}
# Bounded: at most $DOMU_WAIT seconds by the clock (a loaded host slows each round). Dom0
# shares the emulated CPUs with the DomU and every fork and exec costs it under TCG (a
# 1 s round cost /init 18.8 CPU s in a 180 s wait): so a round every 2 s, the clock read
# by the shell, one grep, one sleep, and every 2nd round whether the DomU still runs.
now() { read -r up _ < /proc/uptime; up=${up%.*}; }
now; start=$up result=timeout n=0
while [ $((up - start)) -lt "$DOMU_WAIT" ]; do
    if grep -q -F -e "$GOAL" "$log" "$vlog"; then result=goal; break; fi
    if [ $((n % 2)) = 1 ] && gone; then result=gone; break; fi
    sleep 2
    n=$((n + 1))
    now
done
now
say "domu-$result after $((up - start)) s"
# the CPU time each domain used until then (Dom0 serves the DomU's disk and console)
xl list 2>/dev/null | sed -n 's/^\([^ ]*\) *[0-9][0-9]* *[0-9][0-9]* *\([0-9][0-9]*\) .* \([0-9.][0-9.]*\)$/ARMVM-XEN cpu \1 vcpus=\2 seconds=\3/p'
for be in /local/domain/0/backend/vbd /local/domain/0/backend/vif; do
    xenstore-ls -f "$be" 2>/dev/null | grep -E '/(state|physical-device|mode|params|mac|hotplug-status) ' | \
        sed 's/^/ARMVM-XEN backend /'
done
if [ "$result" = goal ] && [ "$AFTER" = wait ]; then
    # the DomU powers itself off after its marker: give it a moment to go
    n=0
    while [ "$n" -lt 15 ] && ! gone; do sleep 1; n=$((n + 1)); done
    gone && say "domu-poweroff" || say "domu-still-running"
elif [ "$result" = goal ] && [ "$AFTER" = shutdown ]; then
    # a real OS at its login prompt: the PV power-off request (control/shutdown), which
    # the DomU's kernel hands to its init as an orderly power-off; bounded
    now; t=$up
    xl shutdown "$DOMU_NAME" >/dev/null 2>&1 || say "xl shutdown failed"
    while [ $((up - t)) -lt "$POWEROFF_WAIT" ] && ! gone; do sleep 1; now; done
    now
    gone && say "domu-poweroff after $((up - t)) s" || \
        say "domu-still-running after $((up - t)) s"
fi
sleep 1
xl destroy "$DOMU_NAME" >/dev/null 2>&1
end "result=$result"
