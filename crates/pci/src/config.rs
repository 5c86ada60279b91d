//! A type-0 PCI configuration space (PCI Local Bus spec 3.0, section 6): the
//! header, up to six BARs with the sizing protocol, and a capability list.
//!
//! Every byte has a writable mask and a write-1-to-clear mask, so a guest
//! write can only change what the spec lets it change; everything else reads
//! back what the device put there.

use log::debug;

use crate::{Error, Result};

/// Size of the conventional PCI configuration space, in bytes.
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;

/// Size of the PCI Express extended configuration space; bytes from
/// [`PCI_CONFIG_SPACE_SIZE`] up to here read as zero (no extended capabilities).
const PCI_EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const PROG_IF: usize = 0x09;
const SUBCLASS: usize = 0x0a;
const CLASS_CODE: usize = 0x0b;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// First byte after the type-0 header, where capabilities start.
const CAPABILITIES_START: usize = 0x40;

/// Number of BAR slots in a type-0 header.
const NUM_BARS: usize = 6;

/// Command register bits the guest may change: I/O space, memory space, bus
/// master and INTx disable (bits 0, 1, 2 and 10).
const COMMAND_WRITABLE: u16 = 0x0407;
/// Status register bits that are write-1-to-clear: master data parity error
/// (8), signaled/received target abort (11, 12), received master abort (13),
/// signaled system error (14) and detected parity error (15).
const STATUS_W1C: u16 = 0xf900;
/// Status bit 4: the device has a capability list.
const STATUS_CAP_LIST: u16 = 0x0010;

const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64: u32 = 0x4;
const BAR_PREFETCHABLE: u32 = 0x8;
const BAR_IO_ADDR_MASK: u32 = !0x3;
const BAR_MEM_ADDR_MASK: u32 = !0xf;

/// The kind of address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space; uses two BAR slots (`index` and `index + 1`).
    Mem64,
}

/// A base address register: where a device region lives and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    /// BAR slot (0..6); a 64-bit BAR also occupies `index + 1`.
    pub index: u8,
    /// Base address, aligned to `size`.
    pub addr: u64,
    /// Size in bytes, a power of two (at least 16 for memory, 4 for I/O).
    pub size: u64,
    /// Address space the BAR decodes.
    pub kind: BarKind,
    /// Prefetchable memory (bit 3); must be false for I/O BARs.
    pub prefetchable: bool,
}

/// The identity of a function, written into its read-only header fields.
#[derive(Clone, Copy, Debug)]
pub struct PciConfigParams {
    /// Vendor ID (offset 0x00).
    pub vendor_id: u16,
    /// Device ID (offset 0x02).
    pub device_id: u16,
    /// Revision ID (offset 0x08).
    pub revision: u8,
    /// Base class code (offset 0x0b).
    pub class: u8,
    /// Sub-class code (offset 0x0a).
    pub subclass: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
    /// Subsystem vendor ID (offset 0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (offset 0x2e).
    pub subsystem_id: u16,
}

/// A BAR the guest moved (write of a new address, not the all-ones sizing
/// probe): the VMM re-registers the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR slot that moved (the lower slot of a 64-bit BAR).
    pub index: u8,
    /// Address the region was at.
    pub old: u64,
    /// Address the guest programmed.
    pub new: u64,
    /// Size of the region in bytes.
    pub size: u64,
}

/// What a BAR slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    /// Unimplemented: reads 0, ignores writes.
    Empty,
    /// A BAR; `addr` is the last address the guest programmed (not a
    /// sizing-probe value).
    Bar(PciBar),
    /// The upper half of the 64-bit BAR in the slot below.
    Upper,
}

/// A type-0 configuration space as the guest sees it.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u8; PCI_CONFIG_SPACE_SIZE],
    /// Bits the guest may write.
    wmask: [u8; PCI_CONFIG_SPACE_SIZE],
    /// Bits the guest clears by writing 1.
    w1cmask: [u8; PCI_CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability in the list, if any.
    last_cap: Option<u8>,
    /// Where the next capability goes.
    next_cap: usize,
}

impl PciConfiguration {
    /// Creates a header-type-0 configuration space for a single-function
    /// device with the identity in `p`, no BARs, no capabilities and no
    /// legacy interrupt pin. The command register starts at 0 (decoding off).
    pub fn new(p: &PciConfigParams) -> Self {
        let mut c = PciConfiguration {
            regs: [0; PCI_CONFIG_SPACE_SIZE],
            wmask: [0; PCI_CONFIG_SPACE_SIZE],
            w1cmask: [0; PCI_CONFIG_SPACE_SIZE],
            bars: [BarSlot::Empty; NUM_BARS],
            last_cap: None,
            next_cap: CAPABILITIES_START,
        };
        c.put(VENDOR_ID, &p.vendor_id.to_le_bytes());
        c.put(DEVICE_ID, &p.device_id.to_le_bytes());
        c.put(REVISION_ID, &[p.revision]);
        c.put(PROG_IF, &[p.prog_if]);
        c.put(SUBCLASS, &[p.subclass]);
        c.put(CLASS_CODE, &[p.class]);
        c.put(HEADER_TYPE, &[0]);
        c.put(SUBSYSTEM_VENDOR_ID, &p.subsystem_vendor_id.to_le_bytes());
        c.put(SUBSYSTEM_ID, &p.subsystem_id.to_le_bytes());
        put_mask(&mut c.wmask, COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        put_mask(&mut c.w1cmask, STATUS, &STATUS_W1C.to_le_bytes());
        put_mask(&mut c.wmask, INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Adds a BAR. Fails when the slot (or, for a 64-bit BAR, either slot) is
    /// taken or out of range, when the size is not a power of two of at least
    /// 16 bytes (memory) or 4 bytes (I/O), when the address is not aligned to
    /// the size or the region does not fit the BAR's address space, or when
    /// an I/O BAR is marked prefetchable.
    pub fn add_bar(&mut self, bar: PciBar) -> Result<()> {
        let index = usize::from(bar.index);
        let slots = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if index + slots > NUM_BARS {
            return Err(Error::BarIndex { index: bar.index });
        }
        if self.bars[index..index + slots]
            .iter()
            .any(|s| *s != BarSlot::Empty)
        {
            return Err(Error::BarSlotInUse { index: bar.index });
        }
        let (min_size, limit) = match bar.kind {
            BarKind::Io => (4, 1u64 << 32),
            BarKind::Mem32 => (16, 1u64 << 32),
            BarKind::Mem64 => (16, u64::MAX),
        };
        // The largest BAR leaves at least one writable address bit.
        if !bar.size.is_power_of_two() || bar.size < min_size || bar.size > limit / 2 {
            return Err(Error::BarSize {
                index: bar.index,
                size: bar.size,
            });
        }
        if bar.addr & (bar.size - 1) != 0 {
            return Err(Error::BarAlignment {
                index: bar.index,
                addr: bar.addr,
                size: bar.size,
            });
        }
        if bar.addr.checked_add(bar.size).is_none_or(|end| end > limit) {
            return Err(Error::BarRange {
                index: bar.index,
                addr: bar.addr,
                size: bar.size,
            });
        }
        if bar.kind == BarKind::Io && bar.prefetchable {
            return Err(Error::BarPrefetchableIo { index: bar.index });
        }

        let (type_bits, addr_mask) = match bar.kind {
            BarKind::Io => (BAR_IO_SPACE, u64::from(BAR_IO_ADDR_MASK)),
            BarKind::Mem32 => (0, u64::from(BAR_MEM_ADDR_MASK)),
            BarKind::Mem64 => (
                BAR_MEM_64,
                0xffff_ffff_0000_0000 | u64::from(BAR_MEM_ADDR_MASK),
            ),
        };
        let type_bits = if bar.prefetchable {
            type_bits | BAR_PREFETCHABLE
        } else {
            type_bits
        };
        let value = bar.addr | u64::from(type_bits);
        let wmask = !(bar.size - 1) & addr_mask;
        let off = bar_offset(index);
        let (value, wmask) = (value.to_le_bytes(), wmask.to_le_bytes());
        let width = 4 * slots;
        self.put(off, &value[..width]);
        put_mask(&mut self.wmask, off, &wmask[..width]);
        self.bars[index] = BarSlot::Bar(bar);
        if slots == 2 {
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Returns the BAR in slot `index` with the address the guest last
    /// programmed (a sizing probe in progress does not count), or `None` for
    /// an empty slot, the upper half of a 64-bit BAR or an index out of range.
    pub fn bar(&self, index: u8) -> Option<PciBar> {
        match self.bars.get(usize::from(index)) {
            Some(BarSlot::Bar(bar)) => Some(*bar),
            _ => None,
        }
    }

    /// Appends a capability `[cap_id, next = 0, body...]` at the next
    /// dword-aligned offset from 0x40, links it at the end of the list that
    /// starts at the capabilities pointer (0x34), sets the capability-list
    /// bit of the status register and returns the capability's offset. The
    /// capability reads as given and ignores writes unless
    /// [`set_writable`](Self::set_writable) says otherwise.
    pub fn add_capability(&mut self, cap_id: u8, body: &[u8]) -> Result<u8> {
        let start = self.next_cap;
        let len = body.len() + 2;
        let offset = u8::try_from(start)
            .ok()
            .filter(|_| start + len <= PCI_CONFIG_SPACE_SIZE)
            .ok_or(Error::CapabilitySpaceFull {
                cap_id,
                len: body.len(),
            })?;
        self.put(start, &[cap_id, 0]);
        self.put(start + 2, body);
        let link = self
            .last_cap
            .map_or(CAPABILITIES_POINTER, |last| usize::from(last) + 1);
        self.put(link, &[offset]);
        let status = u16::from_le_bytes([self.regs[STATUS], self.regs[STATUS + 1]]);
        self.put(STATUS, &(status | STATUS_CAP_LIST).to_le_bytes());
        self.last_cap = Some(offset);
        self.next_cap = (start + len + 3) & !3;
        Ok(offset)
    }

    /// Makes the bits set in `mask` writable by the guest, starting at
    /// `offset` (for example MSI-X message control bits 14-15). Bytes past
    /// the end of the configuration space are ignored. Meant for capability
    /// bodies: the header's own masks are already set by
    /// [`new`](Self::new) and [`add_bar`](Self::add_bar).
    pub fn set_writable(&mut self, offset: u8, mask: &[u8]) {
        let start = usize::from(offset);
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.wmask.get_mut(start + i) {
                *w |= m;
            }
        }
    }

    /// Reads 1, 2 or 4 bytes at any offset, aligned or not. Bytes between
    /// 256 and 4096 (the absent extended space) read 0, bytes beyond read
    /// 0xff; a length other than 1, 2 or 4 reads all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !valid_len(data.len()) {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let off = usize::from(offset) + i;
            *b = match self.regs.get(off) {
                Some(v) => *v,
                None if off < PCI_EXTENDED_CONFIG_SPACE_SIZE => 0,
                None => 0xff,
            };
        }
    }

    /// Writes 1, 2 or 4 bytes at any offset, honouring read-only and
    /// write-1-to-clear bits; other lengths and bytes past 256 are ignored.
    ///
    /// Returns the move when the write leaves a BAR holding a complete
    /// address that differs from the one last programmed. A BAR that holds a
    /// sizing probe (all writable bits of either dword set) is not reported;
    /// restoring the old address after the probe is not a move either. For a
    /// 64-bit BAR each dword write that changes the combined address is
    /// reported with the combined value. If one unaligned write changes two
    /// BARs, the lower one is reported now and the other on its next write.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        if !valid_len(data.len()) {
            debug!(
                "pci config: ignoring {}-byte write at {offset:#x}",
                data.len()
            );
            return None;
        }
        let start = usize::from(offset);
        for (i, val) in data.iter().enumerate() {
            let off = start + i;
            let (Some(reg), Some(w), Some(c)) = (
                self.regs.get_mut(off),
                self.wmask.get(off),
                self.w1cmask.get(off),
            ) else {
                break;
            };
            *reg = ((*reg & !w) | (val & w)) & !(val & c);
        }
        let end = start + data.len();
        (0..NUM_BARS).find_map(|i| self.check_bar_move(i, start, end))
    }

    /// The 256 bytes of configuration space, for a snapshot.
    pub fn state(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Puts the registers in `regs` (256 bytes saved by
    /// [`state`](Self::state) from a device built the same way). The
    /// identity and BARs must match what this device was built with:
    /// ember does not relocate BARs.
    pub fn restore_state(&mut self, regs: &[u8]) -> Result<()> {
        let regs: [u8; PCI_CONFIG_SPACE_SIZE] = regs.try_into().map_err(|_| {
            Error::State(format!(
                "{} bytes of config space, expected 256",
                regs.len()
            ))
        })?;
        if regs[..4] != self.regs[..4] {
            return Err(Error::State(
                "saved for a device of another vendor or id".into(),
            ));
        }
        let bars = BAR0..BAR0 + 4 * NUM_BARS;
        if regs[bars.clone()] != self.regs[bars] {
            return Err(Error::State("saved with BARs at other addresses".into()));
        }
        self.regs = regs;
        Ok(())
    }

    /// Reads the dword at `offset` (see [`read`](Self::read)).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes the dword `v` at `offset` (see [`write`](Self::write)).
    pub fn write_u32(&mut self, offset: u16, v: u32) -> Option<BarMove> {
        self.write(offset, &v.to_le_bytes())
    }

    /// Stores bytes the device owns, bypassing the guest masks.
    fn put(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(dst) = self.regs.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    fn dword(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(src) = self.regs.get(offset..offset + 4) {
            b.copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    fn wmask_dword(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(src) = self.wmask.get(offset..offset + 4) {
            b.copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    /// Whether the dword at `offset` holds the sizing probe: it has writable
    /// bits and all of them are set.
    fn is_sizing(&self, offset: usize) -> bool {
        let m = self.wmask_dword(offset);
        m != 0 && self.dword(offset) & m == m
    }

    /// After a write to `[start, end)`, reports and records a move of the BAR
    /// in slot `index` if the write touched it and changed its address.
    fn check_bar_move(&mut self, index: usize, start: usize, end: usize) -> Option<BarMove> {
        let BarSlot::Bar(bar) = self.bars.get(index).copied()? else {
            return None;
        };
        let off = bar_offset(index);
        let (new, width) = match bar.kind {
            BarKind::Io => (u64::from(self.dword(off) & BAR_IO_ADDR_MASK), 4),
            BarKind::Mem32 => (u64::from(self.dword(off) & BAR_MEM_ADDR_MASK), 4),
            BarKind::Mem64 => {
                let lo = u64::from(self.dword(off) & BAR_MEM_ADDR_MASK);
                (lo | u64::from(self.dword(off + 4)) << 32, 8)
            }
        };
        if end <= off || start >= off + width {
            return None;
        }
        if self.is_sizing(off) || (width == 8 && self.is_sizing(off + 4)) || new == bar.addr {
            return None;
        }
        let mv = BarMove {
            index: bar.index,
            old: bar.addr,
            new,
            size: bar.size,
        };
        self.bars[index] = BarSlot::Bar(PciBar { addr: new, ..bar });
        Some(mv)
    }
}

fn put_mask(mask: &mut [u8; PCI_CONFIG_SPACE_SIZE], offset: usize, bytes: &[u8]) {
    if let Some(dst) = mask.get_mut(offset..offset + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn bar_offset(index: usize) -> usize {
    BAR0 + 4 * index
}

fn valid_len(len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
}

#[cfg(test)]
mod tests;
