//! The CMOS real-time clock (MC146818) at ports 0x70/0x71: the wall clock firmware reads.
//!
//! Linux on this hardware-reduced platform takes its time from kvmclock, but UEFI firmware
//! (edk2's RealTimeClock driver, and through it the guest's `GetTime()`) and other operating
//! systems read the RTC. It shows the host's UTC time, read at every access, so it never
//! drifts and needs no thread. The guest cannot set the host's clock: writes to the time
//! registers are ignored (a guest that wants another time zone keeps an offset, as Windows
//! does with RealTimeIsUniversal). The remaining bytes are battery-backed RAM the guest may
//! use; the memory-size bytes firmware of the PC tradition reads are filled in.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

pub const CMOS_PORT: u16 = 0x70;
/// Index and data port.
pub const CMOS_PORT_COUNT: u16 = 2;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// Memory between 16 MiB and 4 GiB in 64 KiB units (low, high byte).
const MEM_ABOVE_16M: usize = 0x34;
/// Memory above 4 GiB in 64 KiB units (three bytes).
const MEM_ABOVE_4G: usize = 0x5b;

/// Status A: 32.768 kHz time base, 1024 Hz rate; the update-in-progress bit stays clear.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode (bit 1); bit 2 set would mean binary instead of BCD.
const STATUS_B_24H: u8 = 1 << 1;
const STATUS_B_BINARY: u8 = 1 << 2;
/// Status D: the battery is fine, the time valid.
const STATUS_D_VALID: u8 = 0x80;
/// The index port's top bit masks NMIs; the register number is the rest.
const INDEX_MASK: u8 = 0x7f;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// The wall clock, as seconds since the epoch; a test can replace it.
    now: fn() -> u64,
}

fn host_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian; the
/// algorithm of Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

impl Cmos {
    /// An RTC for a guest with `mem_size` bytes of RAM, of which `low_ram_end` below 4 GiB.
    pub fn new(low_ram_end: u64, mem_size: u64) -> Self {
        Self::with_clock(low_ram_end, mem_size, host_time)
    }

    fn with_clock(low_ram_end: u64, mem_size: u64, now: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A] = STATUS_A_DEFAULT;
        ram[STATUS_B] = STATUS_B_24H;
        ram[STATUS_D] = STATUS_D_VALID;
        let above_16m = (low_ram_end.saturating_sub(16 << 20) >> 16).min(0xffff);
        ram[MEM_ABOVE_16M..MEM_ABOVE_16M + 2].copy_from_slice(&(above_16m as u16).to_le_bytes());
        let above_4g = (mem_size.saturating_sub(low_ram_end) >> 16).min(0xff_ffff) as u32;
        ram[MEM_ABOVE_4G..MEM_ABOVE_4G + 3].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        Cmos { index: 0, ram, now }
    }

    fn read_register(&self, index: usize) -> u8 {
        let secs = (self.now)();
        let days = i64::try_from(secs / 86_400).unwrap_or(0);
        let time = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let binary = self.ram[STATUS_B] & STATUS_B_BINARY != 0;
        let encode = |v: u32| if binary { v as u8 } else { bcd(v) };
        let (hour, minute, second) = (time / 3600, time / 60 % 60, time % 60);
        match index {
            SECONDS => encode(second),
            MINUTES => encode(minute),
            HOURS if self.ram[STATUS_B] & STATUS_B_24H != 0 => encode(hour),
            HOURS => {
                // 12-hour mode: 1-12, bit 7 for PM.
                let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
                encode(h12) | if hour >= 12 { 0x80 } else { 0 }
            }
            // 1970-01-01 was a Thursday; Sunday is 1.
            WEEKDAY => encode(((days + 4).rem_euclid(7) + 1) as u32),
            DAY => encode(day),
            MONTH => encode(month),
            YEAR => encode(year.rem_euclid(100) as u32),
            CENTURY => encode(year.div_euclid(100).clamp(0, 99) as u32),
            _ => self.ram[index],
        }
    }

    fn write_register(&mut self, index: usize, value: u8) {
        match index {
            // The time is the host's; status C and D are read-only.
            SECONDS..=YEAR | CENTURY | STATUS_C | STATUS_D => {}
            // The divider and rate, but never the update-in-progress bit.
            STATUS_A => self.ram[STATUS_A] = value & 0x7f,
            // Data mode and 12/24-hour mode; no interrupts are offered.
            STATUS_B => self.ram[STATUS_B] = value & (STATUS_B_24H | STATUS_B_BINARY),
            _ => self.ram[index] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.read_register(usize::from(self.index)),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value & INDEX_MASK,
            _ => self.write_register(usize::from(self.index), value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-04 18:30:05 UTC, a Friday.
    fn fixed() -> u64 {
        1_796_409_005
    }

    fn reg(c: &mut Cmos, index: u8) -> u8 {
        c.write(0, &[index | 0x80]); // with the NMI-mask bit, as Linux writes it
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn reads_the_host_time_in_bcd() {
        let mut c = Cmos::with_clock(2 << 30, 6 << 30, fixed);
        let time: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&r| reg(&mut c, r as u8))
            .collect();
        assert_eq!(time, [0x05, 0x30, 0x18, 0x06, 0x04, 0x12, 0x26, 0x20]);
        assert_eq!(
            reg(&mut c, STATUS_A as u8) & 0x80,
            0,
            "no update in progress"
        );
        assert_eq!(reg(&mut c, STATUS_D as u8), STATUS_D_VALID);
        // (2 GiB - 16 MiB) / 64 KiB and 4 GiB / 64 KiB.
        assert_eq!(reg(&mut c, 0x34), 0x00);
        assert_eq!(reg(&mut c, 0x35), 0x7f);
        assert_eq!(
            [reg(&mut c, 0x5b), reg(&mut c, 0x5c), reg(&mut c, 0x5d)],
            [0, 0, 1]
        );
    }

    #[test]
    fn binary_and_12_hour_modes_and_read_only_time() {
        let mut c = Cmos::with_clock(1 << 30, 1 << 30, fixed);
        c.write(0, &[STATUS_B as u8]);
        c.write(1, &[STATUS_B_BINARY | 0x70]); // interrupt enables are not offered
        assert_eq!(reg(&mut c, STATUS_B as u8), STATUS_B_BINARY);
        assert_eq!(reg(&mut c, HOURS as u8), 0x80 | 6, "6 PM");
        assert_eq!(reg(&mut c, MINUTES as u8), 30);
        c.write(0, &[SECONDS as u8]);
        c.write(1, &[0x59]);
        assert_eq!(
            reg(&mut c, SECONDS as u8),
            5,
            "the guest cannot set the clock"
        );
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(reg(&mut c, 0x40), 0xab, "CMOS RAM keeps what is written");
        c.write(0, &[]);
        let mut wide = [0xffu8; 4];
        c.read(1, &mut wide);
        assert_eq!(wide[1..], [0, 0, 0]);
    }
}
