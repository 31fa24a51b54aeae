// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * voltail write-event probe.
 *
 * On entry to write(2), writev(2), pwrite64(2), pwritev(2) and pwritev2(2) it resolves the
 * fd to its inode (current->files->fdt->fd[fd]->f_inode) and remembers
 * {dev, ino} for the thread when the inode is a regular file on a watched
 * device and the writer is not the collector itself. On exit, when the call
 * wrote at least one byte, it sends {dev, ino, bytes, pid, cgroup_id, dir_ino} to user
 * space through a ring buffer. A full ring buffer drops the event and counts it
 * in `lost`. A write whose file already has an unread event from the same
 * process on the same CPU is folded into it (counted in `coalesced`): the
 * daemon reads the whole file when that event arrives, so a second event would
 * only cost ring-buffer space and wake-ups. The default program recognises such
 * a write by its open file and inode addresses before it reads anything else
 * about the inode: that is the path of a process writing one line per write.
 *
 * Two attachment flavours share the same logic:
 *   - classic tracepoints syscalls/sys_{enter,exit}_{write,writev,pwrite64,pwritev,pwritev2}
 *     (need tracefs to look up their ids);
 *   - tp_btf sys_enter/sys_exit (no tracefs; fire for every syscall, so they
 *     filter by syscall number first). x86_64 only.
 *
 * `dev` is the kernel's internal dev_t (MAJOR << 20 | MINOR); user space
 * converts it to the st_dev encoding. It is also the key of `watched_devs`.
 *
 * It does not see writes that bypass these syscalls: mmap stores, io_uring,
 * sendfile/splice/copy_file_range, nor writes made on other machines.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define S_IFMT 00170000
#define S_IFREG 0100000

/* Keep in step with `WriteEvent` in lib.rs (a Rust test checks the layout). */
struct write_event {
	__u64 dev;
	__u64 ino;
	__u64 bytes;
	__u32 pid;
	__u32 _pad;
	__u64 cgroup_id;
	/* Inode number of the directory the file was opened in (its dentry's parent). */
	__u64 dir_ino;
};

struct pending {
	__u64 dev;
	__u64 ino;
	__u64 dir_ino;
	__u64 valid;
};

/* Keep in step with `ProbeConfig` in lib.rs. */
struct probe_config {
	__u32 ignore_tgid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Kernel dev_t of the watched filesystems -> unused byte. Filled by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} watched_devs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_config);
} config SEC(".maps");

/* Keep in step with `MuteKey` in loader.rs. */
struct mute_key {
	__u64 dev; /* kernel dev_t, as in watched_devs */
	__u64 ino;
};

/*
 * Inodes on watched devices whose writes the daemon does not want for now (files no glob
 * takes: a pod's debug.log, another shard's files) -> CLOCK_MONOTONIC ns until which their
 * writes send nothing. Filled by user space; LRU, so a full map forgets the least used.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct mute_key);
	__type(value, __u64);
} muted SEC(".maps");

/*
 * Per thread: the file its write in flight goes to. Task-local storage rather
 * than a hash keyed by thread id: a lookup is a pointer chase instead of a
 * hash and lock, nothing needs deleting (exit clears `valid`), and the kernel
 * frees it when the thread ends.
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct pending);
} pending SEC(".maps");

/*
 * Per CPU: the last event this CPU emitted, and where the ring buffer's producer
 * stood just before it was reserved (<= the record's position). While the
 * consumer has not passed that position the record is still unread, so another
 * write to the same file by the same process adds nothing the daemon needs: the
 * file is read after the unread event arrives, and so after this write too.
 */
struct last_emit {
	__u64 dev;
	__u64 ino;
	__u64 pos;
	/* The open file written through and its inode (tp_btf exit-only), or 0. */
	__u64 file;
	__u64 inode;
	__u32 tgid;
	__u32 valid;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct last_emit);
} last_emit SEC(".maps");

/* Writes folded into an unread event (see last_emit), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} coalesced SEC(".maps");

/* Events dropped because the ring buffer was full, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/*
 * The open file behind `fd` of the current task, or NULL. `btf`: called from a tp_btf program
 * (a constant, so each program keeps one branch).
 */
static __always_inline struct file *fd_file(unsigned long fd, const bool btf)
{
	struct fdtable *fdt;
	if (btf) {
		/*
		 * tp_btf programs may load through BTF pointers directly (a fault reads as
		 * zero): bpf_probe_read_kernel calls fewer per write than the chain below,
		 * which the classic tracepoints need.
		 */
		struct files_struct *files = bpf_get_current_task_btf()->files;
		if (!files)
			return NULL;
		fdt = files->fdt;
		if (!fdt || fd >= fdt->max_fds)
			return NULL;
	} else {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		fdt = BPF_CORE_READ(task, files, fdt);
		if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
			return NULL;
	}
	struct file **fds = btf ? fdt->fd : BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (bpf_core_read(&file, sizeof(file), &fds[fd]))
		return NULL;
	return file;
}

/*
 * Whether `file` is a regular file on a watched device, not muted, and `tgid` is not the
 * collector: then fills `out` and returns 1.
 */
static __always_inline int watched_inode(struct file *file, __u32 tgid, struct pending *out)
{
	__u32 zero = 0;
	struct probe_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (cfg && cfg->ignore_tgid == tgid)
		return 0;
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	if (!inode)
		return 0;
	umode_t mode = BPF_CORE_READ(inode, i_mode);
	if ((mode & S_IFMT) != S_IFREG)
		return 0;
	__u32 dev = BPF_CORE_READ(inode, i_sb, s_dev);
	if (!bpf_map_lookup_elem(&watched_devs, &dev))
		return 0;
	out->dev = dev;
	out->ino = BPF_CORE_READ(inode, i_ino);
	struct mute_key mk = { .dev = dev, .ino = out->ino };
	__u64 *until = bpf_map_lookup_elem(&muted, &mk);
	if (until && bpf_ktime_get_ns() < *until)
		return 0;
	/* The directory, so that the daemon can look at it alone for a file it does not know. */
	out->dir_ino = BPF_CORE_READ(file, f_path.dentry, d_parent, d_inode, i_ino);
	out->valid = 1;
	return 1;
}

/* The file behind `fd` of the current task, when watched_inode() says so (see there). */
static __always_inline int watched_file(unsigned long fd, struct pending *out, const bool btf)
{
	struct file *file = fd_file(fd, btf);
	if (!file)
		return 0;
	return watched_inode(file, bpf_get_current_pid_tgid() >> 32, out);
}

/*
 * Whether this CPU's last event came from `tgid` writing to the same inode through the same
 * open file `file`, and is still unread: then the write is folded into it. Checked before
 * anything else about the inode is read, so a writer issuing one write per line pays for the
 * fd lookup, one read of `f_inode` and this (three bpf_probe_read_kernel calls and a hash
 * lookup fewer per write). Both addresses, because a closed file's `struct file` is soon
 * reused for the next open (a process writing 300 new files one after the other gets the same
 * one each time), while the inode of a file written a moment ago is still in memory.
 */
static __always_inline int folded_by_file(struct file *file, __u32 tgid)
{
	__u32 zero = 0;
	struct last_emit *last = bpf_map_lookup_elem(&last_emit, &zero);
	if (!last || !last->valid || last->file != (__u64)file || last->tgid != tgid)
		return 0;
	if (last->inode != (__u64)BPF_CORE_READ(file, f_inode) ||
	    bpf_ringbuf_query(&events, BPF_RB_CONS_POS) > last->pos)
		return 0;
	__u64 *n = bpf_map_lookup_elem(&coalesced, &zero);
	if (n)
		*n += 1; /* per-CPU slot: no other writer */
	return 1;
}

/*
 * Sends the event for a write of `ret` > 0 bytes to `file`, or folds it into an unread one.
 * `fptr`, `iptr`: the open file's and its inode's addresses when known (tp_btf exit-only),
 * else 0.
 */
static __always_inline int emit(struct pending *file, long ret, __u64 fptr, __u64 iptr)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	__u32 tgid = pid_tgid >> 32;
	struct last_emit *last = bpf_map_lookup_elem(&last_emit, &zero);
	if (last && last->valid && last->dev == file->dev && last->ino == file->ino &&
	    last->tgid == tgid &&
	    bpf_ringbuf_query(&events, BPF_RB_CONS_POS) <= last->pos) {
		__u64 *n = bpf_map_lookup_elem(&coalesced, &zero);
		if (n)
			*n += 1; /* per-CPU slot: no other writer */
		return 0;
	}

	__u64 pos = bpf_ringbuf_query(&events, BPF_RB_PROD_POS);
	struct write_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			*n += 1;
		return 0;
	}
	if (last) {
		last->dev = file->dev;
		last->ino = file->ino;
		last->pos = pos;
		last->file = fptr;
		last->inode = iptr;
		last->tgid = tgid;
		last->valid = 1;
	}
	e->dev = file->dev;
	e->ino = file->ino;
	e->bytes = ret;
	e->pid = tgid;
	e->_pad = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->dir_ino = file->dir_ino;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline int on_enter(unsigned long fd, const bool btf)
{
	struct pending file = {};
	if (!watched_file(fd, &file, btf))
		return 0;
	struct pending *p = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!p)
		return 0;
	*p = file;
	return 0;
}

static __always_inline int on_exit(long ret)
{
	struct pending *p = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), 0, 0);
	if (!p || !p->valid)
		return 0;
	struct pending file = *p;
	p->valid = 0;
	if (ret <= 0)
		return 0;
	return emit(&file, ret, 0, 0);
}

/* Classic syscall tracepoints: one program per syscall and direction. */

SEC("tracepoint/syscalls/sys_enter_write")
int voltail_enter_write(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], false);
}

SEC("tracepoint/syscalls/sys_enter_writev")
int voltail_enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], false);
}

SEC("tracepoint/syscalls/sys_enter_pwrite64")
int voltail_enter_pwrite64(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], false);
}

SEC("tracepoint/syscalls/sys_enter_pwritev")
int voltail_enter_pwritev(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], false);
}

/*
 * The four exits share one program body: only `ret` matters, and the pending
 * map already says whether the matching enter kept the file.
 */
/* pwritev2(2) is pwritev with flags (RWF_APPEND, RWF_DSYNC...); same fd argument. */
SEC("tracepoint/syscalls/sys_enter_pwritev2")
int voltail_enter_pwritev2(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], false);
}

SEC("tracepoint/syscalls/sys_exit_write")
int voltail_exit_write(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_writev")
int voltail_exit_writev(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_pwrite64")
int voltail_exit_pwrite64(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_pwritev")
int voltail_exit_pwritev(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_pwritev2")
int voltail_exit_pwritev2(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

/*
 * Syscall numbers (a stable ABI per architecture), and where the raw tracepoints' pt_regs keep
 * the syscall number and the first argument. At sys_exit the first argument register may
 * already hold the return value (arm64's x0), so the fd comes from the copy the kernel saves
 * for syscall restart and tracing: orig_x0 on arm64; x86_64 never overwrites di.
 */
#if defined(__TARGET_ARCH_x86)
/* arch/x86/entry/syscalls/syscall_64.tbl */
#define NR_write 1
#define NR_pwrite64 18
#define NR_writev 20
#define NR_pwritev 296
#define NR_pwritev2 328
#define REGS_NR(regs) ((long)(regs)->orig_ax)
#define REGS_FD(regs) ((regs)->di)
#elif defined(__TARGET_ARCH_arm64)
/* include/uapi/asm-generic/unistd.h */
#define NR_write 64
#define NR_writev 66
#define NR_pwrite64 68
#define NR_pwritev 70
#define NR_pwritev2 287
#define REGS_NR(regs) ((long)(regs)->syscallno)
#define REGS_FD(regs) ((regs)->orig_x0)
#endif

#ifdef NR_write
static __always_inline int is_write(long id)
{
	return id == NR_write || id == NR_writev || id == NR_pwrite64 || id == NR_pwritev ||
	       id == NR_pwritev2;
}

/*
 * tp_btf sys_exit(struct pt_regs *regs, long ret) alone: the default attachment. One program
 * per syscall instead of an enter and an exit per write, and no per-thread state: at exit the
 * call's result is known, so failed writes cost nothing more, and the fd is still in the saved
 * registers. It runs for every syscall, so the cheap checks come first. (The fd is resolved
 * after the write, so a concurrent close + reopen of that fd number by another thread could
 * name another file: the event is a hint, and such a hint costs one needless read.)
 */
SEC("tp_btf/sys_exit")
int voltail_btf_exit_only(__u64 *ctx)
{
	long ret = (long)ctx[1];
	if (ret <= 0)
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx[0];
	if (!is_write(REGS_NR(regs)))
		return 0;
	struct file *f = fd_file(REGS_FD(regs), true);
	if (!f)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (folded_by_file(f, tgid))
		return 0;
	struct pending file = {};
	if (!watched_inode(f, tgid, &file))
		return 0;
	return emit(&file, ret, (__u64)f, (__u64)BPF_CORE_READ(f, f_inode));
}
#endif

/*
 * Does nothing: what any program on the raw sys_exit tracepoint costs a syscall before it does
 * any work (the kernel's tracing slow path and the program's dispatch). `Attach::Floor`, for
 * the bench only: it measures the probe's cost against this floor. The daemon never attaches it.
 */
SEC("tp_btf/sys_exit")
int voltail_btf_floor(__u64 *ctx)
{
	return 0;
}

#if defined(__TARGET_ARCH_x86)
/*
 * tp_btf enter + exit: raw sys_enter(struct pt_regs *regs, long id) and
 * sys_exit(struct pt_regs *regs, long ret), kept for the measurement against the exit-only
 * program. The exit needs no number because the pending map holds an entry only while one of
 * ours is in flight.
 */
SEC("tp_btf/sys_enter")
int voltail_btf_enter(__u64 *ctx)
{
	if (!is_write((long)ctx[1]))
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx[0];
	return on_enter(BPF_CORE_READ(regs, di), true);
}

SEC("tp_btf/sys_exit")
int voltail_btf_exit(__u64 *ctx)
{
	return on_exit((long)ctx[1]);
}
#endif
