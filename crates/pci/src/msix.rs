//! MSI-X (PCI Local Bus spec 3.0, section 6.8.2): the vector table, the
//! pending bit array and the message control bits, with delivery left to an
//! [`MsiSink`].
//!
//! The device puts [`MsixConfig::capability_body`] into its configuration
//! space, maps the table and the PBA into one of its BARs and forwards those
//! MMIO accesses here; guest writes of the capability's message control word
//! go to [`MsixConfig::set_message_control`].

use std::fmt;
use std::sync::Arc;

use log::{debug, warn};

/// The MSI-X capability ID.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// Size of one MSI-X table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;

/// The most vectors a function can have (an 11-bit table size field).
const MAX_VECTORS: u16 = 2048;

/// Message control bit 15: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control bit 14: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// Dwords of a table entry.
const ENTRY_ADDR_LO: usize = 0;
const ENTRY_ADDR_HI: usize = 1;
const ENTRY_DATA: usize = 2;
const ENTRY_CONTROL: usize = 3;
/// Vector control bit 0: the vector is masked. The other bits are reserved.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: what the device writes, and where, to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// Where MSI-X interrupts go. The VMM implements it with KVM GSI routes and
/// irqfds; tests with a recorder.
pub trait MsiSink: Send + Sync {
    /// Called when the address or data of `vector` change.
    fn configure(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()>;
    /// Delivers `vector` now.
    fn fire(&self, vector: u16) -> std::io::Result<()>;
}

/// One table entry as four little-endian dwords: address low, address high,
/// data, vector control.
type Entry = [u32; 4];

const RESET_ENTRY: Entry = [0, 0, 0, VECTOR_MASKED];

/// The saved MSI-X state of one function.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsixState {
    /// Table entries: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Pending bits, 64 vectors a word.
    pub pba: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// The MSI-X state of one function: table, PBA and message control.
pub struct MsixConfig {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
}

impl fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pba", &self.pba)
            .finish_non_exhaustive()
    }
}

impl MsixConfig {
    /// Creates the MSI-X state for `vectors` vectors (clamped to 1..=2048),
    /// every vector masked and MSI-X disabled, delivering through `sink`.
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        if n != vectors {
            warn!("msix: {vectors} vectors requested, using {n}");
        }
        MsixConfig {
            entries: vec![RESET_ENTRY; usize::from(n)],
            pba: vec![0; usize::from(n).div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        u16::try_from(self.entries.len()).unwrap_or(MAX_VECTORS)
    }

    /// Size of the table in bytes (16 per vector).
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors()) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes (one qword per 64 vectors).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors()).div_ceil(64) * 8
    }

    /// The MSI-X capability after its ID and next pointer: message control
    /// (table size N-1 and the current enable and mask bits), table
    /// offset/BIR and PBA offset/BIR. Offsets must be 8-byte aligned (their
    /// low 3 bits are dropped) and BIRs below 6 (only 3 bits are kept).
    pub fn capability_body(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> [u8; 10] {
        let table = (table_offset & !7) | u32::from(table_bar & 7);
        let pba = (pba_offset & !7) | u32::from(pba_bar & 7);
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&self.message_control().to_le_bytes());
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        body
    }

    /// Applies the guest-written message control word: bit 15 enables
    /// MSI-X, bit 14 masks the whole function; the table size bits are
    /// read-only. Enabling or unmasking delivers the pending vectors that are
    /// not masked individually.
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if self.enabled && !self.function_masked {
            for v in 0..self.vectors() {
                if self.is_pending(v) && !self.vector_masked(v) {
                    self.set_pending(v, false);
                    self.fire(v);
                }
            }
        }
    }

    /// The message control word: table size N-1 and the enable and function
    /// mask bits.
    pub fn message_control(&self) -> u16 {
        let mut control = self.vectors().saturating_sub(1);
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Reads the table at byte `offset`: 4 bytes at a dword or 8 bytes at a
    /// qword boundary. Other accesses and offsets past the table read
    /// all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let Some((index, first)) = table_access(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let Some(entry) = self.entries.get(index) else {
            data.fill(0xff);
            return;
        };
        for (chunk, dword) in data.chunks_exact_mut(4).zip(entry.iter().skip(first)) {
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
    }

    /// Writes the table at byte `offset` (same access rules as
    /// [`read_table`](Self::read_table); others are ignored). A change of
    /// address or data is passed to [`MsiSink::configure`]; unmasking a
    /// vector whose pending bit is set clears the bit and fires the vector
    /// if MSI-X is enabled and the function not masked.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, first)) = table_access(offset, data.len()) else {
            debug!(
                "msix: ignoring {}-byte table write at {offset:#x}",
                data.len()
            );
            return;
        };
        let Some(entry) = self.entries.get_mut(index) else {
            debug!("msix: ignoring table write at {offset:#x} past the table");
            return;
        };
        let old = *entry;
        for (chunk, dword) in data.chunks_exact(4).zip(entry.iter_mut().skip(first)) {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            *dword = u32::from_le_bytes(b);
        }
        entry[ENTRY_CONTROL] &= VECTOR_MASKED;
        let new = *entry;
        let Ok(vector) = u16::try_from(index) else {
            return;
        };
        if new[..ENTRY_CONTROL] != old[..ENTRY_CONTROL] {
            let msg = message(&new);
            if let Err(e) = self.sink.configure(vector, msg) {
                warn!("msix: configuring vector {vector} failed: {e}");
            }
        }
        let unmasked = old[ENTRY_CONTROL] & VECTOR_MASKED != 0 && new[ENTRY_CONTROL] == 0;
        if unmasked && self.is_pending(vector) && self.enabled && !self.function_masked {
            self.set_pending(vector, false);
            self.fire(vector);
        }
    }

    /// Reads the pending bit array at byte `offset` (4 bytes at a dword or 8
    /// at a qword boundary; other accesses and offsets past the PBA read
    /// all-ones).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        let qword = aligned(offset, len).and_then(|()| usize::try_from(offset / 8).ok());
        let Some(bits) = qword.and_then(|q| self.pba.get(q)) else {
            data.fill(0xff);
            return;
        };
        let bytes = bits.to_le_bytes();
        let start = usize::try_from(offset % 8).unwrap_or(0);
        match bytes.get(start..start + len) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// Ignores a guest write to the pending bit array (it is read-only).
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "msix: ignoring {}-byte PBA write at {offset:#x}",
            data.len()
        );
    }

    /// Raises `vector`: dropped if MSI-X is disabled or the vector does not
    /// exist, left pending if it or the function is masked, delivered
    /// otherwise.
    pub fn trigger(&mut self, vector: u16) {
        if !self.enabled {
            debug!("msix: vector {vector} dropped, MSI-X disabled");
            return;
        }
        if vector >= self.vectors() {
            debug!(
                "msix: vector {vector} dropped, only {} vectors",
                self.vectors()
            );
            return;
        }
        if self.function_masked || self.vector_masked(vector) {
            self.set_pending(vector, true);
        } else {
            self.fire(vector);
        }
    }

    /// Whether `vector` is pending (false for vectors that do not exist).
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|bits| bits & (1 << (v % 64)) != 0)
    }

    /// The table, pending bits and control bits, for a snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts the table in `state` (same vector count) and configures every
    /// vector that has an address or data through the sink, as the guest's
    /// table writes did before the snapshot.
    pub fn restore_state(&mut self, state: &MsixState) -> Result<(), String> {
        if state.entries.len() != self.entries.len() || state.pba.len() != self.pba.len() {
            return Err(format!(
                "MSI-X: {} vectors saved, the device has {}",
                state.entries.len(),
                self.entries.len()
            ));
        }
        self.entries.clone_from(&state.entries);
        for e in &mut self.entries {
            e[ENTRY_CONTROL] &= VECTOR_MASKED;
        }
        self.pba.clone_from(&state.pba);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for (i, e) in self.entries.iter().enumerate() {
            if e[..ENTRY_CONTROL] != [0, 0, 0] {
                let vector = u16::try_from(i).unwrap_or(u16::MAX);
                self.sink
                    .configure(vector, message(e))
                    .map_err(|err| format!("MSI-X vector {vector}: {err}"))?;
            }
        }
        Ok(())
    }

    /// Returns to the state after [`new`](Self::new): every vector masked
    /// with zero address and data, nothing pending, MSI-X disabled.
    pub fn reset(&mut self) {
        self.entries.fill(RESET_ENTRY);
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    fn vector_masked(&self, vector: u16) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_none_or(|e| e[ENTRY_CONTROL] & VECTOR_MASKED != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(bits) = self.pba.get_mut(v / 64) {
            if pending {
                *bits |= 1 << (v % 64);
            } else {
                *bits &= !(1 << (v % 64));
            }
        }
    }

    fn fire(&self, vector: u16) {
        if let Err(e) = self.sink.fire(vector) {
            warn!("msix: delivering vector {vector} failed: {e}");
        }
    }
}

/// Checks that an access is 4 bytes at a dword or 8 bytes at a qword boundary.
fn aligned(offset: u64, len: usize) -> Option<()> {
    let ok = match len {
        4 => offset % 4 == 0,
        8 => offset % 8 == 0,
        _ => false,
    };
    ok.then_some(())
}

/// Validates a table access: (entry index, first dword of the entry).
fn table_access(offset: u64, len: usize) -> Option<(usize, usize)> {
    aligned(offset, len)?;
    let index = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
    let first = usize::try_from(offset % MSIX_TABLE_ENTRY_SIZE / 4).ok()?;
    Some((index, first))
}

fn message(entry: &Entry) -> MsiMessage {
    MsiMessage {
        addr: u64::from(entry[ENTRY_ADDR_HI]) << 32 | u64::from(entry[ENTRY_ADDR_LO]),
        data: entry[ENTRY_DATA],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What a [`Recorder`] saw.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Event {
        Configure(u16, MsiMessage),
        Fire(u16),
    }

    /// An [`MsiSink`] that records every call.
    #[derive(Default)]
    pub(crate) struct Recorder(Mutex<Vec<Event>>);

    impl Recorder {
        pub(crate) fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl MsiSink for Recorder {
        fn configure(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push(Event::Configure(vector, msg));
            Ok(())
        }
        fn fire(&self, vector: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(Event::Fire(vector));
            Ok(())
        }
    }

    fn msix(vectors: u16) -> (MsixConfig, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (MsixConfig::new(vectors, rec.clone()), rec)
    }

    fn read32(m: &MsixConfig, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read_table(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(m: &mut MsixConfig, offset: u64, v: u32) {
        m.write_table(offset, &v.to_le_bytes());
    }

    /// Enabled, vector `v` programmed and unmasked.
    fn ready(vectors: u16, v: u16) -> (MsixConfig, Arc<Recorder>) {
        let (mut m, rec) = msix(vectors);
        let base = u64::from(v) * 16;
        write32(&mut m, base, 0xfee0_0000);
        write32(&mut m, base + 8, 0x41);
        write32(&mut m, base + 12, 0);
        m.set_message_control(CONTROL_ENABLE);
        rec.take();
        (m, rec)
    }

    #[test]
    fn msix_new_masks_every_vector_and_is_disabled() {
        let (m, _) = msix(3);
        assert_eq!(m.vectors(), 3);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert!(!m.enabled());
        assert_eq!(m.message_control(), 2);
        for v in 0..3u64 {
            assert_eq!(read32(&m, v * 16 + 12), 1);
        }
        let (m, _) = msix(65);
        assert_eq!((m.table_size(), m.pba_size()), (65 * 16, 16));
        let (m, _) = msix(0);
        assert_eq!(m.vectors(), 1);
        let (m, _) = msix(u16::MAX);
        assert_eq!(m.vectors(), 2048);
    }

    #[test]
    fn msix_capability_body_encodes_size_and_bars() {
        let (m, _) = msix(8);
        let body = m.capability_body(2, 0x2000, 2, 0x3000);
        assert_eq!(body, [7, 0, 0x02, 0x20, 0, 0, 0x02, 0x30, 0, 0]);
    }

    #[test]
    fn msix_table_read_write_address_data_control() {
        let (mut m, rec) = msix(4);
        write32(&mut m, 0x10, 0xfee0_1000);
        write32(&mut m, 0x14, 0x1);
        m.write_table(0x18, &[0x42, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(read32(&m, 0x10), 0xfee0_1000);
        assert_eq!(read32(&m, 0x14), 1);
        assert_eq!(read32(&m, 0x18), 0x42);
        // Reserved vector control bits read 0.
        assert_eq!(read32(&m, 0x1c), 0);
        let mut q = [0u8; 8];
        m.read_table(0x10, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        let msgs: Vec<_> = rec
            .take()
            .into_iter()
            .filter_map(|e| match e {
                Event::Configure(1, msg) => Some(msg),
                _ => None,
            })
            .collect();
        assert_eq!(
            msgs.last(),
            Some(&MsiMessage {
                addr: 0x1_fee0_1000,
                data: 0x42
            })
        );
    }

    #[test]
    fn msix_configure_called_only_on_address_or_data_change() {
        let (mut m, rec) = msix(2);
        write32(&mut m, 0x00, 0xfee0_0000);
        assert_eq!(
            rec.take(),
            vec![Event::Configure(
                0,
                MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0
                }
            )]
        );
        write32(&mut m, 0x00, 0xfee0_0000);
        write32(&mut m, 0x0c, 0);
        assert_eq!(rec.take(), vec![]);
        write32(&mut m, 0x08, 7);
        assert_eq!(rec.take().len(), 1);
    }

    #[test]
    fn msix_table_odd_accesses_read_all_ones_and_are_ignored() {
        let (mut m, rec) = msix(2);
        let mut b2 = [0u8; 2];
        m.read_table(0, &mut b2);
        assert_eq!(b2, [0xff; 2]);
        let mut b4 = [0u8; 4];
        m.read_table(2, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        m.read_table(32, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        let mut b8 = [0u8; 8];
        m.read_table(4, &mut b8);
        assert_eq!(b8, [0xff; 8]);
        m.write_table(2, &[0; 4]);
        m.write_table(12, &[0; 2]);
        m.write_table(32, &[0; 4]);
        m.write_table(u64::MAX - 3, &[0; 4]);
        assert_eq!(read32(&m, 12), 1);
        assert_eq!(rec.take(), vec![]);
    }

    #[test]
    fn msix_masked_vector_sets_pending_and_unmask_fires_once() {
        let (mut m, rec) = ready(4, 2);
        write32(&mut m, 2 * 16 + 12, 1);
        m.trigger(2);
        m.trigger(2);
        assert!(m.is_pending(2));
        let mut b = [0u8; 4];
        m.read_pba(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0b100);
        assert_eq!(rec.take(), vec![]);
        write32(&mut m, 2 * 16 + 12, 0);
        assert_eq!(rec.take(), vec![Event::Fire(2)]);
        assert!(!m.is_pending(2));
        write32(&mut m, 2 * 16 + 12, 0);
        assert_eq!(rec.take(), vec![]);
        m.trigger(2);
        assert_eq!(rec.take(), vec![Event::Fire(2)]);
    }

    #[test]
    fn msix_function_mask_holds_vectors_until_cleared() {
        let (mut m, rec) = ready(2, 1);
        m.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(m.message_control(), 0xc001);
        m.trigger(1);
        assert!(m.is_pending(1));
        assert_eq!(rec.take(), vec![]);
        m.set_message_control(CONTROL_ENABLE);
        assert_eq!(rec.take(), vec![Event::Fire(1)]);
        assert!(!m.is_pending(1));
    }

    #[test]
    fn msix_disabled_drops_and_out_of_range_is_ignored() {
        let (mut m, rec) = ready(2, 0);
        m.trigger(2);
        m.trigger(u16::MAX);
        m.set_message_control(0);
        m.trigger(0);
        assert!(!m.is_pending(0));
        assert!(!m.is_pending(2));
        m.set_message_control(CONTROL_ENABLE);
        assert_eq!(rec.take(), vec![]);
        m.trigger(0);
        assert_eq!(rec.take(), vec![Event::Fire(0)]);
    }

    #[test]
    fn msix_pba_is_read_only_and_checks_access() {
        let (mut m, _) = ready(70, 69);
        write32(&mut m, 69 * 16 + 12, 1);
        m.trigger(69);
        m.write_pba(8, &[0; 8]);
        let mut q = [0u8; 8];
        m.read_pba(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 5);
        let mut b = [0u8; 4];
        m.read_pba(12, &mut b);
        assert_eq!(b, [0; 4]);
        m.read_pba(16, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read_pba(4, &mut q);
        assert_eq!(q, [0xff; 8]);
    }

    #[test]
    fn msix_reset_restores_initial_state() {
        let (mut m, _) = ready(2, 1);
        write32(&mut m, 16 + 12, 1);
        m.trigger(1);
        m.reset();
        assert!(!m.enabled());
        assert!(!m.is_pending(1));
        assert_eq!(read32(&m, 16), 0);
        assert_eq!(read32(&m, 16 + 12), 1);
    }
}
