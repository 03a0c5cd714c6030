//! kxdp's XDP program on one interface: `bpf/kxdp_filter.bpf.c`, compiled with clang by
//! `build.rs`, embedded in the binary, loaded with libbpf-rs, attached with a BPF link.
//!
//! libbpf does what is hard to get right by hand: reading the ELF, creating the BTF-defined
//! maps, patching their descriptors into the program, and fetching the verifier's log when
//! the kernel refuses it. The rest stays on plain `bpf(2)` calls, as before: the link is made
//! with `BPF_LINK_CREATE` because libbpf's `bpf_program__attach_xdp` cannot ask for native
//! or generic mode, and map elements are written with `BPF_MAP_UPDATE_ELEM` so that a failure
//! keeps its errno (libbpf-rs's errors carry only a message).
//!
//! The attachment is a BPF link held by a file descriptor: it detaches when the descriptor
//! closes, whether by drop, process exit or crash, and the interface's traffic goes back to
//! the kernel. Nothing is pinned, so nothing is left behind on the interface and no bpffs is
//! needed.

use std::cell::RefCell;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use libbpf_rs::{MapCore, ObjectBuilder, PrintLevel};

use super::config::{Installed, Steering};
use super::iface::ifname;
use super::{XskError, ATTACH, LOAD, UPDATE_MAP};

/// The compiled program (`build.rs` writes it to `OUT_DIR`).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kxdp_filter.bpf.o"));
/// The program's function name in the object.
const PROGRAM: &str = "kxdp_filter";

// Commands, types and flags from include/uapi/linux/bpf.h (enum bpf_cmd, bpf_attach_type)
// and include/uapi/linux/if_link.h (XDP_FLAGS_*).
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_UPDATE: libc::c_int = 29;
/// `enum bpf_link_type`'s `BPF_LINK_TYPE_XDP`.
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_ANY: u64 = 0;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native if the driver accepts it, else generic.
    Auto,
    /// In the driver (`XDP_FLAGS_DRV_MODE`): before any socket buffer is built.
    Native,
    /// Generic (`XDP_FLAGS_SKB_MODE`): after the socket buffer is built; works on any device.
    Generic,
}

/// `union bpf_attr` for BPF_MAP_LOOKUP_ELEM / UPDATE_ELEM / DELETE_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_LINK_CREATE (XDP needs no more than these).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The leading fields of `struct bpf_link_info`; the kernel fills as much as it is given.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// The first word of the type's part: an XDP link's interface index.
    ifindex: u32,
    _pad2: u32,
}

/// `bpf(cmd, attr, sizeof attr)`; returns the new descriptor (or 0) on success.
///
/// # Safety
/// `A` must be the `bpf_attr` layout `cmd` expects, and every pointer inside it valid for what
/// the command reads or writes through it.
unsafe fn bpf<A>(cmd: libc::c_int, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: forwarded from the caller; `attr` is valid for `size_of::<A>()` bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut A).cast::<libc::c_void>(),
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` was just returned by bpf() as a new descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// One map of the program, by descriptor, with its sizes for checking keys and values.
pub(super) struct BpfMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl BpfMap {
    /// Writes `value` at `key` (BPF_ANY: create or replace).
    pub(super) fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert_eq!(
            (key.len(), value.len()),
            (self.key_size, self.value_size),
            "key and value sizes of the map"
        );
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: BPF_ANY,
            ..MapElemAttr::default()
        };
        // SAFETY: MapElemAttr is the BPF_MAP_UPDATE_ELEM layout; `key` and `value` are live
        // for the call and have the map's key and value sizes (checked above).
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    /// Deletes `key`; an absent key is not an error.
    pub(super) fn delete(&self, key: &[u8]) -> io::Result<()> {
        assert_eq!(key.len(), self.key_size, "key size of the map");
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: MapElemAttr is the BPF_MAP_DELETE_ELEM layout; `key` is live for the call
        // and has the map's key size (checked above).
        match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Reads `key` into `value`, which holds one value, or one per possible CPU for a per-CPU
    /// map (each rounded up to 8 bytes).
    pub(super) fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<()> {
        assert_eq!(key.len(), self.key_size, "key size of the map");
        assert!(value.len() >= self.value_size, "value buffer too small");
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: MapElemAttr is the BPF_MAP_LOOKUP_ELEM layout; `key` has the key size and
        // `value` is writable for the whole value the kernel copies out (the caller sizes it
        // for per-CPU maps).
        unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }.map(drop)
    }
}

/// The program's maps (names as in `kxdp_filter.bpf.c`).
pub(super) struct Maps {
    pub(super) xsks: BpfMap,
    pub(super) config: BpfMap,
    pub(super) prefix4: BpfMap,
    pub(super) prefix6: BpfMap,
    pub(super) ports: BpfMap,
    pub(super) ranges: BpfMap,
    pub(super) owned: BpfMap,
    pub(super) nodes: BpfMap,
    pub(super) stats: BpfMap,
}

/// kxdp's XDP program attached to one interface, with its maps.
///
/// It starts either redirecting every frame ([`XdpProgram::attach`], for pod-facing ports) or
/// filtering ([`XdpProgram::attach_filter`], for the uplink: only what the filter tables name
/// goes to AF_XDP, everything else to the kernel). The filter tables are set with the
/// methods in `filter.rs` (`allow_prefix`, `allow_port`, ...). Until [`XdpProgram::insert`]
/// fills a queue's slot, that queue's traffic goes to the kernel whatever the tables say.
///
/// Dropping it closes the link (the program detaches), the program and the maps.
pub struct XdpProgram {
    /// Declared first so the program detaches before the rest closes. `None` for a
    /// program loaded to take over a predecessor's link ([`XdpProgram::load_detached`]).
    link: OnceLock<OwnedFd>,
    _prog: OwnedFd,
    pub(super) maps: Maps,
    /// What the filter tables hold, kept to compute differences and to write the config
    /// array whole; the lock also serialises updates.
    pub(super) installed: Mutex<Installed>,
    queues: u32,
    /// `Native` or `Generic` once attached.
    mode: OnceLock<XdpMode>,
    /// The interface.
    ifindex: u32,
    /// Interface name, for messages.
    pub(super) target: String,
}

impl XdpProgram {
    /// Loads the program with an XSKMAP of `queues` slots, redirecting every frame of queue i
    /// to slot i, and attaches it to interface `ifindex` (of the calling thread's network
    /// namespace) in `mode`. `Auto` tries native first and falls back to generic when the
    /// driver refuses; the mode chosen is logged and returned by [`XdpProgram::mode`].
    pub fn attach(ifindex: u32, queues: u32, mode: XdpMode) -> Result<XdpProgram, XskError> {
        XdpProgram::attach_steering(ifindex, queues, mode, Steering::RedirectAll)
    }

    /// As [`XdpProgram::attach`], but filtering, with empty tables: every frame goes to the
    /// kernel until entries are added. Attach this to the uplink, then fill the tables.
    pub fn attach_filter(ifindex: u32, queues: u32, mode: XdpMode) -> Result<XdpProgram, XskError> {
        XdpProgram::attach_steering(ifindex, queues, mode, Steering::Filter)
    }

    /// As [`XdpProgram::attach`], starting with `steering`. The steering is written before
    /// the program is attached, so no frame ever sees another.
    pub fn attach_steering(
        ifindex: u32,
        queues: u32,
        mode: XdpMode,
        steering: Steering,
    ) -> Result<XdpProgram, XskError> {
        XdpProgram::load_detached(ifindex, queues, steering)?.link_to(mode)
    }

    /// Attaches a program loaded by [`XdpProgram::load_detached`] (its maps written as
    /// wanted: every frame sees them) to its interface in `mode`, as
    /// [`XdpProgram::attach`] does.
    pub fn link_to(self, mode: XdpMode) -> Result<XdpProgram, XskError> {
        let program = self;
        let steering = program.steering();
        let ifindex = program.ifindex;
        let target = &program.target;
        let tries: &[(XdpMode, u32)] = match mode {
            XdpMode::Auto => &[
                (XdpMode::Native, XDP_FLAGS_DRV_MODE),
                (XdpMode::Generic, XDP_FLAGS_SKB_MODE),
            ],
            XdpMode::Native => &[(XdpMode::Native, XDP_FLAGS_DRV_MODE)],
            XdpMode::Generic => &[(XdpMode::Generic, XDP_FLAGS_SKB_MODE)],
        };
        let mut last = None;
        for &(m, flags) in tries {
            match link_create(&program._prog, ifindex, BPF_XDP, flags) {
                Ok(link) => {
                    match link_info(&link) {
                        Ok(info) => log::info!(
                            "{target}: kxdp XDP program {} attached in {m:?} mode, {steering:?}, \
                             by BPF link {} (closed when kxdp exits; by hand: bpftool link \
                             detach id {})",
                            info.prog_id,
                            info.id,
                            info.id
                        ),
                        Err(e) => log::info!(
                            "{target}: kxdp XDP program attached in {m:?} mode, {steering:?} \
                             (link id unknown: {e})"
                        ),
                    }
                    let _ = program.link.set(link);
                    let _ = program.mode.set(m);
                    return Ok(program);
                }
                Err(e) => {
                    if mode == XdpMode::Auto && m == XdpMode::Native {
                        log::info!("{target}: native XDP refused ({e}); trying generic");
                    }
                    last = Some(e);
                }
            }
        }
        let err = last.unwrap_or_else(|| io::Error::other("no attach mode tried"));
        Err(XskError::os(ATTACH, target.clone(), err))
    }

    /// Loads the program with an XSKMAP of `queues` slots for interface `ifindex`, its
    /// steering written, without attaching it: fill its XSKMAP and tables, then [`XdpProgram::take_link`] a
    /// predecessor's link, which puts it in place of the predecessor's program in one step.
    pub fn load_detached(
        ifindex: u32,
        queues: u32,
        steering: Steering,
    ) -> Result<XdpProgram, XskError> {
        let target = ifname(ifindex);
        let queues = queues.max(1);
        let (prog, maps) = load(queues, &target)?;
        let installed = Installed::new(steering);
        maps.config
            .update(&[0u8; 4], &installed.config_value())
            .map_err(|e| XskError::os(UPDATE_MAP, target.clone(), e))?;
        Ok(XdpProgram {
            link: OnceLock::new(),
            _prog: prog,
            maps,
            installed: Mutex::new(installed),
            queues,
            mode: OnceLock::new(),
            ifindex,
            target,
        })
    }

    /// Makes `link`, a predecessor's XDP link on this program's interface attached in
    /// `mode`, run this program (`BPF_LINK_UPDATE`): every frame after the call sees this
    /// program, every frame before it the old one; the interface is never without one.
    /// The link is this program's from now on. Fails for a program attached already.
    pub fn take_link(&self, link: OwnedFd, mode: XdpMode) -> Result<(), XskError> {
        if self.link.get().is_some() {
            return Err(XskError::os(
                ATTACH,
                self.target.clone(),
                io::Error::other("the program is attached already"),
            ));
        }
        let info = link_info(&link).map_err(|e| XskError::os(ATTACH, self.target.clone(), e))?;
        if info.link_type != BPF_LINK_TYPE_XDP || info.ifindex != self.ifindex {
            return Err(XskError::os(
                ATTACH,
                self.target.clone(),
                io::Error::other(format!(
                    "the handed link {} is not an XDP link on this interface (type {}, ifindex {})",
                    info.id, info.link_type, info.ifindex
                )),
            ));
        }
        let mut attr = LinkUpdateAttr {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: self._prog.as_raw_fd() as u32,
            ..LinkUpdateAttr::default()
        };
        // SAFETY: LinkUpdateAttr is the BPF_LINK_UPDATE layout and holds no pointers.
        unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }
            .map_err(|e| XskError::os(ATTACH, self.target.clone(), e))?;
        let _ = self.link.set(link);
        let _ = self.mode.set(mode);
        log::info!(
            "{}: kxdp XDP program {} took over BPF link {} in {mode:?} mode",
            self.target,
            self.program_id().unwrap_or(0),
            info.id
        );
        Ok(())
    }

    /// The link that holds the attachment, for a successor ([`XdpProgram::take_link`]).
    pub fn link_fd(&self) -> Option<BorrowedFd<'_>> {
        self.link.get().map(AsFd::as_fd)
    }

    /// The mode in effect: `Native` or `Generic` (`Auto` while detached).
    pub fn mode(&self) -> XdpMode {
        self.mode.get().copied().unwrap_or(XdpMode::Auto)
    }

    fn attached_info(&self) -> Result<LinkInfo, XskError> {
        let link = self.link.get().ok_or_else(|| {
            XskError::os(
                ATTACH,
                self.target.clone(),
                io::Error::other("the program is not attached"),
            )
        })?;
        link_info(link).map_err(|e| XskError::os(ATTACH, self.target.clone(), e))
    }

    /// The kernel's id of the BPF link that holds the attachment, as `bpftool link show`
    /// lists it: `bpftool link detach id ID` detaches the program by hand.
    pub fn link_id(&self) -> Result<u32, XskError> {
        self.attached_info().map(|i| i.id)
    }

    /// The kernel's id of the attached program, as `ip link show` prints it (`prog/xdp id`).
    pub fn program_id(&self) -> Result<u32, XskError> {
        self.attached_info().map(|i| i.prog_id)
    }

    /// Steers receive queue `queue` into AF_XDP socket `socket_fd` (bound to that queue of
    /// this interface, with an RX ring).
    pub fn insert(&self, queue: u32, socket_fd: RawFd) -> Result<(), XskError> {
        self.check_queue(queue)?;
        let value = (socket_fd as u32).to_ne_bytes();
        self.maps
            .xsks
            .update(&queue.to_ne_bytes(), &value)
            .map_err(|e| XskError::os(UPDATE_MAP, format!("{} queue {queue}", self.target), e))
    }

    /// Stops steering `queue`: its traffic goes to the kernel stack again.
    pub fn remove(&self, queue: u32) -> Result<(), XskError> {
        self.check_queue(queue)?;
        self.maps
            .xsks
            .delete(&queue.to_ne_bytes())
            .map_err(|e| XskError::os(UPDATE_MAP, format!("{} queue {queue}", self.target), e))
    }

    fn check_queue(&self, queue: u32) -> Result<(), XskError> {
        if queue >= self.queues {
            return Err(XskError::os(
                UPDATE_MAP,
                format!("{} queue {queue}", self.target),
                io::Error::from_raw_os_error(libc::E2BIG),
            ));
        }
        Ok(())
    }
}

/// Ids of the link `fd` and of its program.
fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: InfoAttr is the BPF_OBJ_GET_INFO_BY_FD layout; `info` is writable for
    // `info_len` bytes for the call, and the kernel writes no more than that.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

thread_local! {
    /// libbpf's messages while this thread loads a program, for the error if loading fails.
    static LIBBPF_LOG: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// libbpf's print callback: kept for the load error when this thread is loading, and passed
/// to `log` (libbpf's warnings as debug lines then, since the error carries them).
fn libbpf_print(level: PrintLevel, msg: String) {
    let kept = LIBBPF_LOG.with(|l| match l.borrow_mut().as_mut() {
        Some(buf) => {
            buf.push_str(&msg);
            true
        }
        None => false,
    });
    let msg = msg.trim_end();
    match level {
        PrintLevel::Warn if !kept => log::warn!("{msg}"),
        PrintLevel::Debug => log::trace!("{msg}"),
        _ => log::debug!("{msg}"),
    }
}

/// Opens the embedded object, sizes its XSKMAP to `queues` and loads it; returns the
/// program's and maps' descriptors (libbpf's object is closed, the duplicates keep them).
fn load(queues: u32, target: &str) -> Result<(OwnedFd, Maps), XskError> {
    let (prog, obj) = load_object(OBJECT, PROGRAM, target, |open| {
        for mut m in open.maps_mut() {
            if m.name() == "kxdp_xsks" {
                m.set_max_entries(queues)?;
            }
        }
        Ok(())
    })?;
    let map = |name: &str| map_of(&obj, name, target);
    let maps = Maps {
        xsks: map("kxdp_xsks")?,
        config: map("kxdp_config")?,
        prefix4: map("kxdp_prefix4")?,
        prefix6: map("kxdp_prefix6")?,
        ports: map("kxdp_ports")?,
        ranges: map("kxdp_ranges")?,
        owned: map("kxdp_owned")?,
        nodes: map("kxdp_nodes")?,
        stats: map("kxdp_stats")?,
    };
    Ok((prog, maps))
}

/// Opens an embedded BPF object, lets `customize` adjust it (map sizes), loads it, and
/// returns a descriptor of its program `program` with the loaded object (for its maps,
/// [`map_of`]). A refusal by the verifier carries libbpf's log.
pub(super) fn load_object(
    object: &'static [u8],
    program: &str,
    target: &str,
    customize: impl FnOnce(&mut libbpf_rs::OpenObject) -> libbpf_rs::Result<()>,
) -> Result<(OwnedFd, libbpf_rs::Object), XskError> {
    libbpf_rs::set_print(Some((PrintLevel::Info, libbpf_print)));
    LIBBPF_LOG.with(|l| *l.borrow_mut() = Some(String::new()));
    let loaded = (|| {
        let mut open = ObjectBuilder::default().name("kxdp")?.open_memory(object)?;
        customize(&mut open)?;
        open.load()
    })();
    let log = LIBBPF_LOG
        .with(|l| l.borrow_mut().take())
        .unwrap_or_default();
    let obj = loaded.map_err(|e| {
        if e.kind() == libbpf_rs::ErrorKind::PermissionDenied {
            XskError::os(LOAD, target, io::Error::from_raw_os_error(libc::EPERM))
        } else {
            XskError::Verifier {
                target: target.to_string(),
                err: io::Error::other(e.to_string()),
                log: log.trim().to_string(),
            }
        }
    })?;
    let prog = obj
        .progs()
        .find(|p| p.name() == program)
        .ok_or_else(|| {
            XskError::os(
                LOAD,
                target,
                io::Error::other(format!("the embedded object has no program {program}")),
            )
        })?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| XskError::os(LOAD, target, e))?;
    Ok((prog, obj))
}

/// The map `name` of a loaded object, by a descriptor of its own.
pub(super) fn map_of(
    obj: &libbpf_rs::Object,
    name: &str,
    target: &str,
) -> Result<BpfMap, XskError> {
    let m = obj.maps().find(|m| m.name() == name).ok_or_else(|| {
        XskError::os(
            LOAD,
            target,
            io::Error::other(format!("the embedded object has no map {name}")),
        )
    })?;
    Ok(BpfMap {
        fd: m
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| XskError::os(LOAD, target, e))?,
        key_size: m.key_size() as usize,
        value_size: m.value_size() as usize,
    })
}

/// Attaches program `prog` to interface `ifindex` as `attach_type` (with `flags`) by a
/// BPF link: the attachment lasts as long as the returned descriptor.
pub(super) fn link_create(
    prog: &OwnedFd,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags,
    };
    // SAFETY: LinkCreateAttr is the BPF_LINK_CREATE layout (the kernel zero-fills the
    // fields after it) and holds no pointers.
    unsafe { bpf(BPF_LINK_CREATE, &mut attr) }.map(owned)
}

/// Ids of the link `fd` and of its program.
pub(super) fn link_ids(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    link_info(fd).map(|i| (i.id, i.prog_id))
}

/// The summed per-CPU `u64` counters 0..N of a per-CPU array map.
pub(super) fn percpu_counters<const N: usize>(map: &BpfMap) -> io::Result<[u64; N]> {
    // SAFETY: libbpf_num_possible_cpus only reads /sys/devices/system/cpu/possible (once,
    // then cached) and has no preconditions.
    let cpus = unsafe { libbpf_rs::libbpf_sys::libbpf_num_possible_cpus() };
    if cpus <= 0 {
        return Err(io::Error::from_raw_os_error(-cpus));
    }
    let mut buf = vec![0u8; 8 * cpus as usize];
    let mut sums = [0u64; N];
    for (i, sum) in sums.iter_mut().enumerate() {
        map.lookup(&(i as u32).to_ne_bytes(), &mut buf)?;
        *sum = buf
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
            .sum();
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_uapi_offsets() {
        assert_eq!(size_of::<MapElemAttr>(), 32);
        assert_eq!(size_of::<LinkCreateAttr>(), 16);
        assert_eq!(size_of::<InfoAttr>(), 16);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(std::mem::offset_of!(LinkInfo, prog_id), 8);
        assert_eq!(std::mem::offset_of!(LinkInfo, ifindex), 16);
    }

    #[test]
    fn the_embedded_object_is_a_bpf_elf() {
        // ELF magic, 64-bit, and e_machine EM_BPF (247).
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(OBJECT[4], 2);
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
