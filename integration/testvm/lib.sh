# shellcheck shell=bash
# Helpers shared by the integration scripts (sourced, never executed).
# Every message a script prints about itself goes to stderr with a prefix, so it
# never mixes with the output of the command under test.

: "${THVC_LOG_PREFIX:=thvc}"

log() {
    printf '[%s] %s\n' "$THVC_LOG_PREFIX" "$*" >&2
}

die() {
    printf '[%s] error: %s\n' "$THVC_LOG_PREFIX" "$*" >&2
    exit 1
}

# read_le32 FILE OFFSET: print the little-endian u32 at byte OFFSET of FILE.
read_le32() {
    local value
    value=$(od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' ')
    [[ -n $value ]] || die "cannot read 4 bytes at offset $2 of $1"
    printf '%s\n' "$value"
}

# read_u8 FILE OFFSET
read_u8() {
    local value
    value=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    [[ -n $value ]] || die "cannot read 1 byte at offset $2 of $1"
    printf '%s\n' "$value"
}

# module_load_list KERNEL_ROOT KERNEL_RELEASE SPEC...
# Prints, in load order and without duplicates, the modules that SPECs need, one
# per line as "PATH [OPTIONS]" with PATH relative to lib/modules/KERNEL_RELEASE.
# A SPEC is NAME or NAME:OPT=VAL[,OPT=VAL...]. Built-in modules print nothing.
# The host's modprobe configuration is ignored (-C /dev/null) so the list does
# not depend on the machine that builds it.
module_load_list() {
    local kernel_root=$1 release=$2
    shift 2
    local modroot="$kernel_root/lib/modules/$release"
    local -A seen=()
    local spec name options resolved line verb path rel top
    for spec in "$@"; do
        name=${spec%%:*}
        options=""
        [[ $spec == *:* ]] && options=${spec#*:} && options=${options//,/ }
        resolved=$(modprobe -C /dev/null -d "$kernel_root" -S "$release" --show-depends "$name") ||
            die "kernel $release has no module '$name' (modprobe --show-depends failed)"
        [[ -n $resolved ]] || die "modprobe --show-depends printed nothing for '$name'"
        top=$(grep '^insmod ' <<<"$resolved" | tail -n 1 | awk '{print $2}') || true
        while read -r verb path _; do
            case $verb in
            builtin) continue ;;
            insmod) ;;
            *) die "unexpected modprobe output for '$name': $verb $path" ;;
            esac
            rel=${path#"$modroot"/}
            [[ $rel != "$path" ]] || die "module $path is outside $modroot"
            [[ -z ${seen[$rel]:-} ]] || continue
            seen[$rel]=1
            line=$rel
            [[ $path == "$top" && -n $options ]] && line="$rel $options"
            printf '%s\n' "$line"
        done <<<"$resolved"
    done
}

# module_names SPEC...: the module names of SPECs (see module_load_list), one
# per line, as /sys/module spells them.
module_names() {
    local spec name
    for spec in "$@"; do
        name=${spec%%:*}
        printf '%s\n' "${name//-/_}"
    done
}

# module_options SPEC...: modprobe.d "options" lines for SPECs that have some.
module_options() {
    local spec options
    for spec in "$@"; do
        [[ $spec == *:* ]] || continue
        options=${spec#*:}
        printf 'options %s %s\n' "${spec%%:*}" "${options//,/ }"
    done
}

# busybox_rootfs DIR: populate DIR with a static busybox and one symlink per
# applet, plus the directories and the /dev/console node that the kernel needs
# before /init runs (it opens /dev/console for init's stdio).
busybox_rootfs() {
    local dir=$1 busybox=${THVC_BUSYBOX:-/bin/busybox} applet
    mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,mnt}
    cp "$busybox" "$dir/bin/busybox"
    chmod 0755 "$dir/bin/busybox"
    while read -r applet; do
        [[ $applet == bin/busybox || -e $dir/$applet ]] && continue
        ln -s /bin/busybox "$dir/$applet"
    done < <("$busybox" --list-full)
    mknod -m 0600 "$dir/dev/console" c 5 1
    mknod -m 0666 "$dir/dev/null" c 1 3
}

# write_cpio_gz DIR OUTPUT: pack DIR as a reproducible newc cpio, gzip it.
write_cpio_gz() {
    local dir=$1 out=$2
    (cd "$dir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) |
        gzip -n -6 >"$out"
}
