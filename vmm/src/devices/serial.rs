//! COM1: a 16550A UART (vm-superio) at 0x3f8, IRQ 4, its output going to stdout, a file or
//! nowhere, its input fed from the host terminal by the main loop.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::{Counter, DeviceMetrics};
use super::BusDevice;
use crate::config::SerialTarget;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const UART_PORT_COUNT: u16 = 8;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub enum SerialSink {
    Stdout,
    File(File),
    Discard,
}

impl SerialSink {
    pub fn open(target: &SerialTarget) -> io::Result<Self> {
        Ok(match target {
            SerialTarget::Stdout => SerialSink::Stdout,
            SerialTarget::None => SerialSink::Discard,
            SerialTarget::File(path) => SerialSink::File(open_log(path)?),
        })
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => io::stdout().write(buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Discard => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().flush(),
            // Appends go straight to the file; nothing is buffered here.
            SerialSink::File(_) | SerialSink::Discard => Ok(()),
        }
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialSink>,
    /// Log a failing output only once, not once per byte.
    output_failed: bool,
    tx_bytes: Counter,
    rx_bytes: Counter,
}

impl SerialDevice {
    pub fn new(irq: Arc<EventFd>, sink: SerialSink) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), sink),
            output_failed: false,
            tx_bytes: Counter::default(),
            rx_bytes: Counter::default(),
        }
    }

    /// Reports bytes sent by the guest (`tx_bytes`) and given to it (`rx_bytes`).
    pub fn with_metrics(mut self, metrics: &DeviceMetrics) -> Self {
        self.tx_bytes = metrics.counter("tx_bytes");
        self.rx_bytes = metrics.counter("rx_bytes");
        self
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => {
                self.rx_bytes.add(n as u64);
                n
            }
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

/// What a snapshot keeps of the UART: its registers and the input the guest has not read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes a snapshot's UART state, keeping this device's interrupt and output.
    pub fn restore(&mut self, snapshot: &SerialSnapshot) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: snapshot.baud_divisor_low,
            baud_divisor_high: snapshot.baud_divisor_high,
            interrupt_enable: snapshot.interrupt_enable,
            interrupt_identification: snapshot.interrupt_identification,
            line_control: snapshot.line_control,
            line_status: snapshot.line_status,
            modem_control: snapshot.modem_control,
            modem_status: snapshot.modem_status,
            scratch: snapshot.scratch,
            in_buffer: snapshot.in_buffer.clone(),
        };
        let irq = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(IrqTrigger(irq.0.clone()), SerialSink::Discard),
        );
        let sink = old.into_writer();
        match Serial::from_state(&state, irq, NoEvents, sink) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(format!("serial port state refused: {e:?}")),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        // Offset 0 is the transmit register (and, briefly at boot, the divisor latch).
        if offset == 0 {
            self.tx_bytes.inc();
        }
        if let Err(e) = self.uart.write(offset, value) {
            if !self.output_failed {
                tracing::warn!("guest console output is being lost: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_file_and_raise_the_irq() {
        let dir = tempfile::Builder::new()
            .prefix("thvc-serial-")
            .tempdir()
            .expect("tmp");
        let path = dir.path().join("console.log");
        let irq = Arc::new(EventFd::new(0).expect("eventfd"));
        let sink = SerialSink::open(&SerialTarget::File(path.clone())).expect("open");
        let mut dev = SerialDevice::new(irq.clone(), sink);
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).expect("read"), b"hi\n");
        assert!(irq.read().expect("irq raised") > 0);
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let irq = Arc::new(EventFd::new(0).expect("eventfd"));
        let mut dev = SerialDevice::new(irq, SerialSink::Discard);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr, *b"a");
    }

    #[test]
    fn a_restored_port_keeps_its_registers_and_unread_input() {
        let irq = Arc::new(EventFd::new(0).expect("eventfd"));
        let mut dev = SerialDevice::new(irq.clone(), SerialSink::Discard);
        dev.write(3, &[0x03]); // LCR: 8 bits
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"xy");
        let saved: SerialSnapshot =
            serde_json::from_value(serde_json::to_value(dev.state()).expect("json")).expect("back");
        let mut restored = SerialDevice::new(irq, SerialSink::Discard);
        restored.restore(&saved).expect("restore");
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        restored.read(3, &mut b);
        assert_eq!(b, [0x03]);
        restored.read(0, &mut b);
        assert_eq!(b, *b"x", "unread input survives");

        let mut too_much = saved.clone();
        too_much.in_buffer = vec![0; 4096];
        assert!(restored.restore(&too_much).is_err(), "a FIFO over its size");
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let irq = Arc::new(EventFd::new(0).expect("eventfd"));
        let mut dev = SerialDevice::new(irq, SerialSink::Discard);
        dev.write(0, &[]);
        dev.write(300, &[1]);
        let mut empty: [u8; 0] = [];
        dev.read(0, &mut empty);
    }
}
