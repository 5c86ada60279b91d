//! The MC146818 CMOS real-time clock on ports 0x70 (index) and 0x71 (data):
//! enough that a guest reading the wall clock at boot gets the host's UTC time.

use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// The index port.
pub const CMOS_PORT_BASE: u16 = 0x70;
/// Index and data ports.
pub const CMOS_PORT_SIZE: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate; update-in-progress never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_DEFAULT: u8 = 0x02;
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Status D: the battery is good, the time is valid.
const STATUS_D_VALID: u8 = 0x80;

/// A calendar time in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
    /// 1 (Sunday) to 7 (Saturday), as the RTC counts.
    pub weekday: u8,
}

/// Converts seconds since the Unix epoch to a UTC calendar time (days to
/// civil date after H. Hinnant's `civil_from_days`).
pub fn datetime_from_unix(secs: u64) -> DateTime {
    // Every field below is bounded by the calendar (at most 60), so the
    // narrowing cannot fail; `small` keeps it checked anyway.
    let small = |v: u64| u8::try_from(v).unwrap_or(u8::MAX);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // 1970-01-01 was a Thursday (5 in 1..=7 counting from Sunday).
    let weekday = small((days + 4) % 7 + 1);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = small(doy - (153 * mp + 2) / 5 + 1);
    let month = small(if mp < 10 { mp + 3 } else { mp - 9 });
    let year = yoe + era * 400 + u64::from(month <= 2);
    DateTime {
        year: u32::try_from(year).unwrap_or(u32::MAX),
        month,
        day,
        hour: small(rem / 3600),
        minute: small((rem / 60) % 60),
        second: small(rem % 60),
        weekday,
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// Where the clock reads the time from (the host's clock, or a fixed time in tests).
pub type TimeSource = fn() -> u64;

fn host_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The CMOS RTC and its 128 bytes of NVRAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: TimeSource,
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos::new(host_time)
    }
}

impl Cmos {
    /// A CMOS clock reading the time from `now`.
    pub fn new(now: TimeSource) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_STATUS_A)] = STATUS_A_DEFAULT;
        nvram[usize::from(REG_STATUS_B)] = STATUS_B_DEFAULT;
        nvram[usize::from(REG_STATUS_D)] = STATUS_D_VALID;
        Cmos {
            index: 0,
            nvram,
            now,
        }
    }

    /// The index register and NVRAM.
    pub fn state(&self) -> crate::CmosState {
        crate::CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Puts the clock in `state`; NVRAM of another size is an error.
    pub fn restore_state(&mut self, state: &crate::CmosState) -> Result<(), String> {
        self.nvram = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS: {} bytes of NVRAM, expected 128", state.nvram.len()))?;
        self.index = state.index & 0x7f;
        Ok(())
    }

    fn encode(&self, v: u8) -> u8 {
        if self.nvram[usize::from(REG_STATUS_B)] & STATUS_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.nvram[usize::from(REG_STATUS_B)] & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        // 12-hour mode: 12, 1..11, with bit 7 for PM.
        let pm = hour >= 12;
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if pm { 0x80 } else { 0 }
    }

    /// The value of register `reg`.
    pub fn read_register(&mut self, reg: u8) -> u8 {
        let reg = reg & 0x7f;
        let t = datetime_from_unix((self.now)());
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(u8::try_from(t.year % 100).unwrap_or(0)),
            REG_CENTURY => self.encode(u8::try_from((t.year / 100) % 100).unwrap_or(0)),
            // Reading status C acknowledges (no) pending interrupts.
            REG_STATUS_C => 0,
            r => self.nvram[usize::from(r)],
        }
    }

    /// Writes register `reg`. Writes to the time registers are ignored: the
    /// clock follows the host.
    pub fn write_register(&mut self, reg: u8, value: u8) {
        let reg = reg & 0x7f;
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                log::debug!("cmos: guest write to clock register {reg:#x} ignored");
            }
            REG_STATUS_A => {
                // The update-in-progress bit is read-only.
                self.nvram[usize::from(reg)] = value & 0x7f;
            }
            REG_STATUS_C | REG_STATUS_D => {}
            r => self.nvram[usize::from(r)] = value,
        }
    }
}

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset, data) {
            (0, [byte]) => *byte = self.index,
            (1, [byte]) => *byte = self.read_register(self.index),
            (_, data) => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (offset, data) {
            // Bit 7 of the index port masks NMIs on real hardware; the index
            // is the low seven bits.
            (0, [byte]) => self.index = byte & 0x7f,
            (1, [byte]) => self.write_register(self.index, *byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PioAddress = PioAddress(CMOS_PORT_BASE);
    // 2026-11-21 06:21:46 UTC, a Saturday.
    const FIXED: u64 = 1_795_242_106;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.pio_write(BASE, 0, &[reg]);
        let mut b = [0];
        c.pio_read(BASE, 1, &mut b);
        b[0]
    }

    #[test]
    fn cmos_state_round_trips_nvram_and_index() {
        let mut a = Cmos::new(|| FIXED);
        a.pio_write(BASE, 0, &[0x40]);
        a.pio_write(BASE, 1, &[0x99]);
        let saved = a.state();
        let mut b = Cmos::new(|| FIXED);
        b.restore_state(&saved).unwrap();
        assert_eq!(b.state(), saved);
        assert_eq!(read(&mut b, 0x40), 0x99);
        let mut bad = saved.clone();
        bad.nvram.pop();
        assert!(b.restore_state(&bad).is_err());
    }

    #[test]
    fn datetime_from_unix_known_dates() {
        let t = datetime_from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        let t = datetime_from_unix(951_782_400); // 2000-02-29
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
        let t = datetime_from_unix(FIXED);
        assert_eq!(
            t,
            DateTime {
                year: 2026,
                month: 11,
                day: 21,
                hour: 6,
                minute: 21,
                second: 46,
                weekday: 7
            }
        );
    }

    #[test]
    fn cmos_reads_time_in_bcd() {
        let mut c = Cmos::new(|| FIXED);
        assert_eq!(read(&mut c, REG_SECONDS), 0x46);
        assert_eq!(read(&mut c, REG_MINUTES), 0x21);
        assert_eq!(read(&mut c, REG_HOURS), 0x06);
        assert_eq!(read(&mut c, REG_DAY), 0x21);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 0x07);
        assert_eq!(read(&mut c, REG_STATUS_D), STATUS_D_VALID);
        assert_eq!(
            read(&mut c, REG_STATUS_A) & 0x80,
            0,
            "no update in progress"
        );
    }

    #[test]
    fn cmos_binary_and_12_hour_modes_follow_status_b() {
        let mut c = Cmos::new(|| FIXED + 12 * 3600); // 18:21:46
        c.pio_write(BASE, 0, &[REG_STATUS_B]);
        c.pio_write(BASE, 1, &[STATUS_B_BINARY]);
        assert_eq!(read(&mut c, REG_MINUTES), 21);
        assert_eq!(read(&mut c, REG_HOURS), 0x80 | 6, "6 PM in 12-hour mode");
    }

    #[test]
    fn cmos_nvram_keeps_writes_but_clock_ignores_them() {
        let mut c = Cmos::new(|| FIXED);
        c.pio_write(BASE, 0, &[0x40]);
        c.pio_write(BASE, 1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.pio_write(BASE, 0, &[REG_SECONDS]);
        c.pio_write(BASE, 1, &[0x00]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x46);
    }

    #[test]
    fn cmos_index_masks_the_nmi_bit_and_odd_accesses_are_ignored() {
        let mut c = Cmos::new(|| FIXED);
        c.pio_write(BASE, 0, &[0x80 | REG_YEAR]);
        let mut b = [0];
        c.pio_read(BASE, 1, &mut b);
        assert_eq!(b[0], 0x26);
        let mut wide = [0u8; 2];
        c.pio_read(BASE, 0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        c.pio_write(BASE, 5, &[1]);
    }
}
