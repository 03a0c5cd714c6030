//! The XDP program that steers each receive queue into its AF_XDP socket, built without
//! libbpf: an XSKMAP made with `bpf(BPF_MAP_CREATE)`, five hand-assembled instructions loaded
//! with `bpf(BPF_PROG_LOAD)`, attached with `bpf(BPF_LINK_CREATE)`.
//!
//! The program is
//!
//! ```text
//! r2 = *(u32 *)(r1 + 16)     ; xdp_md.rx_queue_index
//! r1 = map[xskmap]           ; ld_imm64, BPF_PSEUDO_MAP_FD
//! r3 = XDP_PASS              ; bpf_redirect_map's fallback when the slot is empty
//! call bpf_redirect_map      ; helper 51
//! exit
//! ```
//!
//! so a queue with no socket keeps going to the kernel stack.
//!
//! The attachment is a BPF link held by a file descriptor: it detaches when the descriptor
//! closes, whether by drop, process exit or crash. Nothing is pinned, so nothing is left
//! behind on the interface.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::iface::ifname;
use super::{XskError, ATTACH, CREATE_MAP, UPDATE_MAP};

// Commands, types and flags from include/uapi/linux/bpf.h (enum bpf_cmd, bpf_map_type,
// bpf_prog_type, bpf_attach_type) and include/uapi/linux/if_link.h (XDP_FLAGS_*).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_ANY: u64 = 0;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `enum xdp_action` XDP_PASS (include/uapi/linux/bpf.h).
const XDP_PASS: i32 = 2;
/// `BPF_FUNC_redirect_map` (include/uapi/linux/bpf.h, `___BPF_FUNC_MAPPER`).
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
/// Offset of `rx_queue_index` in `struct xdp_md` (include/uapi/linux/bpf.h).
const XDP_MD_RX_QUEUE_INDEX: i16 = 16;
/// Verifier log buffer: the five-instruction program's log is a few hundred bytes; this leaves
/// room for a kernel that explains more.
const LOG_SIZE: usize = 64 * 1024;

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

/// One instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one (little-endian bitfields).
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The steering program for XSKMAP `map_fd`.
fn program(map_fd: RawFd) -> [Insn; 6] {
    // Opcodes: BPF_LDX|BPF_MEM|BPF_W, BPF_LD|BPF_DW|BPF_IMM, BPF_ALU64|BPF_MOV|BPF_K,
    // BPF_JMP|BPF_CALL, BPF_JMP|BPF_EXIT (include/uapi/linux/bpf_common.h, bpf.h).
    [
        insn(0x61, 2, 1, XDP_MD_RX_QUEUE_INDEX, 0),
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0), // upper half of the 64-bit immediate
        insn(0xb7, 3, 0, 0, XDP_PASS),
        insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        insn(0x95, 0, 0, 0, 0),
    ]
}

/// `union bpf_attr` for BPF_MAP_CREATE (leading fields; the kernel zero-extends).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM / BPF_MAP_DELETE_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
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

/// The steering program attached to one interface, with its XSKMAP.
///
/// Dropping it closes the link (the program detaches), the program and the map.
pub struct XdpProgram {
    /// Declared first so the program detaches before the rest closes.
    _link: OwnedFd,
    _prog: OwnedFd,
    map: OwnedFd,
    queues: u32,
    mode: XdpMode,
    /// Interface name, for messages.
    target: String,
}

impl XdpProgram {
    /// Creates an XSKMAP of `queues` slots, loads the steering program and attaches it to
    /// interface `ifindex` (of the calling thread's network namespace) in `mode`. `Auto`
    /// tries native first and falls back to generic when the driver refuses; the mode chosen
    /// is logged and returned by [`XdpProgram::mode`].
    pub fn attach(ifindex: u32, queues: u32, mode: XdpMode) -> Result<XdpProgram, XskError> {
        let target = ifname(ifindex);
        let queues = queues.max(1);
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(b"kxdp_xsk");
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: queues,
            map_name: name,
            ..MapCreateAttr::default()
        };
        // SAFETY: MapCreateAttr is the BPF_MAP_CREATE layout and holds no pointers.
        let map = owned(
            unsafe { bpf(BPF_MAP_CREATE, &mut attr) }
                .map_err(|e| XskError::os(CREATE_MAP, target.clone(), e))?,
        );
        let prog = load(map.as_raw_fd(), &target)?;
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
            let mut attr = LinkCreateAttr {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags,
            };
            // SAFETY: LinkCreateAttr is the BPF_LINK_CREATE layout and holds no pointers.
            match unsafe { bpf(BPF_LINK_CREATE, &mut attr) } {
                Ok(fd) => {
                    log::info!("{target}: XDP steering program attached in {m:?} mode");
                    return Ok(XdpProgram {
                        _link: owned(fd),
                        _prog: prog,
                        map,
                        queues,
                        mode: m,
                        target,
                    });
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
        Err(XskError::os(ATTACH, target, err))
    }

    /// The mode in effect: `Native` or `Generic`.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// Steers receive queue `queue` into AF_XDP socket `socket_fd` (bound to that queue of
    /// this interface, with an RX ring).
    pub fn insert(&self, queue: u32, socket_fd: RawFd) -> Result<(), XskError> {
        let value = socket_fd as u32;
        self.update(BPF_MAP_UPDATE_ELEM, queue, Some(&value))
    }

    /// Stops steering `queue`: its traffic goes to the kernel stack again.
    pub fn remove(&self, queue: u32) -> Result<(), XskError> {
        self.update(BPF_MAP_DELETE_ELEM, queue, None)
    }

    fn update(&self, cmd: libc::c_int, queue: u32, value: Option<&u32>) -> Result<(), XskError> {
        let target = format!("{} queue {queue}", self.target);
        if queue >= self.queues {
            return Err(XskError::os(
                UPDATE_MAP,
                target,
                io::Error::from_raw_os_error(libc::E2BIG),
            ));
        }
        let mut attr = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &queue as *const u32 as u64,
            value: value.map_or(0, |v| v as *const u32 as u64),
            flags: BPF_ANY,
            ..MapElemAttr::default()
        };
        // SAFETY: MapElemAttr is the layout of both element commands; `key` (and `value` for
        // an update) point at live u32s, the map's key and value sizes.
        unsafe { bpf(cmd, &mut attr) }.map_err(|e| XskError::os(UPDATE_MAP, target, e))?;
        Ok(())
    }
}

/// Loads the steering program for `map_fd`; on refusal, loads again with a log to report
/// what the verifier said.
fn load(map_fd: RawFd, target: &str) -> Result<OwnedFd, XskError> {
    let insns = program(map_fd);
    let license: &CStr = c"Dual BSD/GPL";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"kxdp_xsk");
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..ProgLoadAttr::default()
    };
    // SAFETY: ProgLoadAttr is the BPF_PROG_LOAD layout; `insns` and `license` outlive the call.
    if let Ok(fd) = unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        return Ok(owned(fd));
    }
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above, and `log` is writable for `log_size` bytes for the call.
    match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => Ok(owned(fd)),
        Err(err) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(XskError::Verifier {
                target: target.to_string(),
                err,
                log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_encodes_as_the_kernel_expects() {
        let p = program(7);
        assert_eq!(size_of::<Insn>(), 8);
        // r2 = *(u32 *)(r1 + 16): dst 2, src 1.
        assert_eq!((p[0].code, p[0].regs, p[0].off), (0x61, 0x12, 16));
        // ld_imm64 r1 with the map fd, src = BPF_PSEUDO_MAP_FD.
        assert_eq!((p[1].code, p[1].regs, p[1].imm), (0x18, 0x11, 7));
        assert_eq!((p[3].regs, p[3].imm), (3, XDP_PASS));
        assert_eq!((p[4].code, p[4].imm), (0x85, 51));
        assert_eq!(p[5].code, 0x95);
    }

    #[test]
    fn attr_layouts_match_the_uapi_offsets() {
        assert_eq!(size_of::<MapElemAttr>(), 32);
        assert_eq!(size_of::<LinkCreateAttr>(), 16);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
    }
}
