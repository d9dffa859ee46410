//! What a checkpoint carries of the guest's memory. The device state is saved with
//! `xen-save-devices-state`, which writes no RAM at all: the guest's RAM reaches the standby as
//! pages of its shared RAM file. Any other RAM block the guest can write (a VGA card's video
//! RAM, for one) would be lost on failover, so the primary refuses to start checkpointing a
//! guest that has one. Read-only blocks (firmware, option ROMs, ACPI tables) are rebuilt by
//! the standby's QEMU from the same configuration.

use super::qmp::{self, Qmp};
use serde_json::json;

/// Errors checking a guest's RAM blocks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU did not list its RAM blocks.
    #[error("listing the guest's RAM blocks (info ramblock)")]
    Qmp(#[from] qmp::Error),
    /// The listing did not parse.
    #[error("QEMU's RAM block listing has a line we cannot read: {line:?}")]
    Garbled {
        /// The line.
        line: String,
    },
    /// The guest can write RAM that is not in the shared RAM file.
    #[error(
        "the guest can write RAM outside its shared RAM file ({blocks}): a checkpoint would not carry it, so FT cannot protect this VM; remove the device that owns it"
    )]
    Unshared {
        /// The writable blocks besides the RAM file, with their sizes.
        blocks: String,
    },
}

/// One line of `info ramblock`.
#[derive(Debug, PartialEq, Eq)]
struct Block {
    name: String,
    used: u64,
    writable: bool,
}

/// Checks that the only RAM the guest can write is its shared RAM file of `ram_bytes`.
pub async fn check_shared(qmp: &mut Qmp, ram_bytes: u64) -> Result<(), Error> {
    let listing = qmp
        .execute(
            "human-monitor-command",
            json!({ "command-line": "info ramblock" }),
        )
        .await?;
    let blocks = parse(listing.as_str().unwrap_or_default())?;
    unshared(&blocks, ram_bytes)
}

/// The writable blocks besides one RAM file of `ram_bytes` make an error.
fn unshared(blocks: &[Block], ram_bytes: u64) -> Result<(), Error> {
    let mut writable: Vec<&Block> = blocks.iter().filter(|b| b.writable).collect();
    if let Some(at) = writable.iter().position(|b| b.used == ram_bytes) {
        writable.remove(at);
    }
    if writable.is_empty() {
        return Ok(());
    }
    let blocks = writable
        .iter()
        .map(|b| format!("{} of {} bytes", b.name, b.used))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::Unshared { blocks })
}

/// Parses `info ramblock`: a header, then per block its name, page size (`4 KiB`), offset,
/// used and total bytes, host address and `ro`/`rw`.
fn parse(listing: &str) -> Result<Vec<Block>, Error> {
    let garbled = |line: &str| Error::Garbled {
        line: line.to_string(),
    };
    let mut blocks = Vec::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields.first() == Some(&"Block") {
            continue;
        }
        // The name may hold spaces: the seven fields after it are counted from the end.
        let Some(name_fields) = fields.len().checked_sub(7).filter(|n| *n > 0) else {
            return Err(garbled(line));
        };
        let tail = &fields[name_fields..];
        let used = tail
            .get(3)
            .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| garbled(line))?;
        let writable = match tail.get(6) {
            Some(&"rw") => true,
            Some(&"ro") => false,
            _ => return Err(garbled(line)),
        };
        blocks.push(Block {
            name: fields[..name_fields].join(" "),
            used,
            writable,
        });
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `info ramblock` of a lab FT domain (QEMU 10.0, pc-i440fx, virtio-net).
    const LAB: &str = "              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f83cffff000  rw
                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000 0x00007f8424400000  ro
                  pc.rom    4 KiB  0x0000000010040000 0x0000000000020000 0x0000000000020000 0x00007f8424200000  ro
0000:00:03.0/virtio-net-pci.rom    4 KiB  0x0000000010080000 0x0000000000040000 0x0000000000040000 0x00007f83cee00000  ro
    /rom@etc/acpi/tables    4 KiB  0x00000000100c0000 0x0000000000020000 0x0000000000200000 0x00007f83ce000000  ro
";

    #[test]
    fn a_guest_writing_only_its_ram_file_passes() {
        let blocks = parse(LAB).unwrap();
        assert_eq!(blocks.len(), 5);
        assert_eq!(
            blocks[0],
            Block {
                name: "pc.ram".into(),
                used: 256 << 20,
                writable: true
            }
        );
        assert_eq!(blocks[3].name, "0000:00:03.0/virtio-net-pci.rom");
        unshared(&blocks, 256 << 20).unwrap();
    }

    #[test]
    fn video_ram_is_refused_by_name() {
        let listing = format!(
            "{LAB}                vga.vram    4 KiB  0x0000000010400000 0x0000000001000000 0x0000000001000000 0x00007f83cc000000  rw\n"
        );
        let error = unshared(&parse(&listing).unwrap(), 256 << 20).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("vga.vram of 16777216 bytes"), "{text}");
    }

    #[test]
    fn a_ram_file_of_another_size_is_not_the_guest_ram() {
        assert!(matches!(
            unshared(&parse(LAB).unwrap(), 512 << 20),
            Err(Error::Unshared { .. })
        ));
    }

    #[test]
    fn a_line_without_its_fields_is_garbled() {
        for line in [
            "pc.ram 4 KiB 0x0 0x10000000",
            "pc.ram 4 KiB 0x0 zz 0x0 0x0 rw",
            "x 4 KiB 0x0 0x1 0x1 0x0 maybe",
        ] {
            assert!(matches!(parse(line), Err(Error::Garbled { .. })), "{line}");
        }
    }
}
