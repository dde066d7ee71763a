#!/bin/bash
# The two writable-layer designs, measured with the shell tools (as root): mounting a 1 GiB
# tmpfs against creating a sparse 1 GiB ext4 image on a loop device (truncate, mkfs.ext4,
# losetup, mount) and tearing it down; then 500 MB written into each. N rounds (default 20).
set -e
D=/var/tmp/arl-disk-ab; mkdir -p $D/mnt
N=${N:-20}
now() { date +%s%N; }
t_tmpfs=(); t_img=()
for i in $(seq $N); do
  a=$(now); mount -t tmpfs -o size=1024m tmpfs $D/mnt; b=$(now); umount $D/mnt; c=$(now)
  t_tmpfs+=($(( (b-a)/1000 )))
  a=$(now)
  truncate -s 1024M $D/img; mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard -O ^has_journal $D/img
  dev=$(losetup -f --show $D/img); mount -o nodev,nosuid $dev $D/mnt
  b=$(now)
  umount $D/mnt; losetup -d $dev; rm -f $D/img
  c=$(now)
  t_img+=($(( (b-a)/1000 ))",teardown $(( (c-b)/1000 ))")
done
echo "tmpfs mount us: ${t_tmpfs[*]}"
echo "image create+mount us: ${t_img[*]}"
# write throughput 500 MB
mount -t tmpfs -o size=1024m tmpfs $D/mnt
a=$(now); dd if=/dev/zero of=$D/mnt/f bs=1M count=500 conv=fsync status=none; b=$(now)
echo "tmpfs write 500MB ms: $(( (b-a)/1000000 ))"; umount $D/mnt
truncate -s 1024M $D/img; mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard -O ^has_journal $D/img
dev=$(losetup -f --show $D/img); mount $dev $D/mnt
a=$(now); dd if=/dev/zero of=$D/mnt/f bs=1M count=500 status=none; b=$(now); sync; c=$(now)
echo "image write 500MB ms: $(( (b-a)/1000000 )) (+sync $(( (c-b)/1000000 )))"
umount $D/mnt; losetup -d $dev; rm -f $D/img
