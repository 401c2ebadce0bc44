//! The VM description and the QEMU command line built from it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How the VM is shown. Only the front end: the emulated devices do not depend on it, so a VM suspended with
/// one display can be resumed with another.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Display {
    /// Headless: no window; the serial console goes to [`VmConfig::console_log`].
    #[default]
    None,
    /// A GTK window on the local desktop.
    Gtk,
    /// A VNC server. `listen` is QEMU's VNC display spec, e.g. `127.0.0.1:0` (port 5900) or `unix:/path`.
    Vnc { listen: String },
}

/// The VM's network. Only the back end and the link: the virtio NIC itself is always part of the machine, so
/// a memory image saved with one setting resumes with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// No working network: the NIC's link is down before the guest runs (QEMU then drops every packet either
    /// way, and the guest sees a NIC without carrier), and its back end is user-mode networking with
    /// `restrict=on` (no host, no outside network). Not "no back end": a NIC without a peer offers the guest
    /// other virtio features, and QEMU rejects a memory image saved with a back end.
    None,
    /// User-mode NAT (QEMU's slirp: the guest is 10.0.2.15, the host is reachable as 10.0.2.2).
    #[default]
    Nat,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Nat => "nat",
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU id of the NIC (for QMP `set_link`).
pub const NIC_ID: &str = "nic0";
/// The NIC's MAC address: fixed, so the guest sees the same NIC on every client.
pub const NIC_MAC: &str = "52:54:00:12:34:56";

/// CPU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    Kvm,
    /// Software emulation: works everywhere, slower.
    #[default]
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// PCI slots (bus 0, function 0) of the machine's devices: the order in which QEMU assigns them when the
/// devices are given in [`VmConfig::qemu_args`]' order (slot 0 is the host bridge, 1 the PIIX3 ISA/IDE/ACPI
/// functions, the VGA adapter takes the first free slot at machine creation). Both drivers put the devices
/// at exactly these addresses, so the guest sees the same machine under either, and memory images saved by
/// QEMU-direct before the addresses were explicit still load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlots {
    pub vga: Option<u8>,
    pub xhci: Option<u8>,
    pub virtio_serial: Option<u8>,
    pub disk: u8,
    pub nic: Option<u8>,
}

impl PciSlots {
    pub fn of(config: &VmConfig) -> PciSlots {
        let mut next = 2u8;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let vga = take(config.vga);
        let xhci = take(config.vga);
        let virtio_serial = take(config.agent_channel);
        let disk = take(true).unwrap_or(2);
        let nic = take(config.nic);
        PciSlots { vga, xhci, virtio_serial, disk, nic }
    }
}

/// Everything needed to start QEMU for one VM.
///
/// Fields marked *machine* define the emulated hardware and must be identical when a memory image is saved
/// and when it is resumed (QEMU rejects the image otherwise); the others may change between runs.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// A name for the VM in the VMM's listings (the libvirt domain is named `NAME-PID`); `None`: `isr`.
    /// QEMU-direct always names its QEMU `isr` (see [`VmConfig::qemu_args`]).
    pub name: Option<String>,
    /// *machine*: guest RAM in MiB.
    pub memory_mib: u32,
    /// *machine*: virtual CPUs.
    pub cpus: u32,
    /// *machine*: QEMU machine type. Default `pc`, an alias for the newest `pc-i440fx-X.Y` of the installed
    /// QEMU; use a versioned name (see `Vm::machine_type`) to resume images across QEMU upgrades.
    pub machine: String,
    /// *machine*: CPU model; `None` = QEMU's default (`qemu64`), which migrates between hosts and accelerators.
    pub cpu: Option<String>,
    /// *machine*: a standard VGA adapter with a USB tablet (absolute pointer, so a VNC or GTK pointer lines up)
    /// beside the board's PS/2 keyboard. Without it only the serial console exists.
    pub vga: bool,
    /// *machine*: a virtio-serial port named `org.qemu.guest_agent.0` for the QEMU guest agent.
    pub agent_channel: bool,
    /// *machine*: a virtio NIC (`nic0`); [`VmConfig::network`] says what it reaches.
    pub nic: bool,
    /// Where the host end of the agent channel listens (a Unix socket); `None`: not connected this run.
    pub agent_socket: Option<PathBuf>,
    /// Direct kernel boot (the kernel, initrd and command line are loaded into RAM: part of the memory image).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// The disk: an NBD server on this Unix socket, attached as a virtio-blk device.
    pub disk_nbd_socket: PathBuf,
    /// NBD export name, `None` for the default export.
    pub disk_export: Option<String>,
    pub display: Display,
    /// The NIC's back end and link (with [`VmConfig::nic`]).
    pub network: Network,
    /// Where the guest's serial console goes (in every display mode). `None`: a GTK virtual console with
    /// `Display::Gtk`, else nowhere.
    pub console_log: Option<PathBuf>,
    /// A Unix socket on which the serial console is also served, interactive (`isr console`); output still goes
    /// to `console_log`.
    pub console_socket: Option<PathBuf>,
    /// A private directory for QEMU's QMP socket (the caller removes it). `None`: a fresh temporary
    /// directory, removed when the [`crate::Vm`] is dropped.
    pub runtime_dir: Option<PathBuf>,
    pub accel: Accel,
    /// The QEMU binary (looked up in `PATH` when relative).
    pub qemu: PathBuf,
    /// More arguments appended verbatim.
    pub extra_args: Vec<OsString>,
    /// Guest RAM as a shared mapping of this file (`memory-backend-file,share=on`, QEMU-direct only), e.g. a
    /// file that isr serves on demand through FUSE. Then [`crate::Vm::suspend`] saves only the device state
    /// (`x-ignore-shared`): the RAM stays in the file. `None`: QEMU's own anonymous RAM, saved whole.
    pub shared_ram: Option<PathBuf>,
}

/// The id of the RAM backend (and so of QEMU's RAM block): `pc.ram`, as QEMU's own RAM of a `pc` machine,
/// so that a memory image with the RAM in it loads into a VM whose RAM is a shared file.
pub const RAM_BACKEND_ID: &str = "pc.ram";

impl VmConfig {
    /// A headless TCG VM with `memory_mib` MiB, one CPU, and its disk on `disk_nbd_socket`.
    pub fn new(memory_mib: u32, disk_nbd_socket: impl Into<PathBuf>) -> Self {
        VmConfig {
            name: None,
            memory_mib,
            cpus: 1,
            machine: "pc".into(),
            cpu: None,
            vga: false,
            agent_channel: false,
            nic: false,
            agent_socket: None,
            kernel: None,
            initrd: None,
            append: None,
            disk_nbd_socket: disk_nbd_socket.into(),
            disk_export: None,
            display: Display::None,
            network: Network::Nat,
            console_log: None,
            console_socket: None,
            runtime_dir: None,
            accel: Accel::Tcg,
            qemu: PathBuf::from(DEFAULT_QEMU),
            extra_args: Vec::new(),
            shared_ram: None,
        }
    }

    /// The QEMU arguments (without the binary). `incoming` adds `-S -incoming defer`.
    pub fn qemu_args(&self, qmp_socket: &Path, incoming: bool) -> Vec<OsString> {
        let mut a = Args::default();
        a.push("-nodefaults");
        a.push("-no-user-config");
        a.pair("-name", "isr,process=isr-qemu");
        match &self.shared_ram {
            Some(path) => {
                a.pair(
                    "-machine",
                    format!("{},accel={},memory-backend={RAM_BACKEND_ID}", self.machine, self.accel),
                );
                let mut object = OsString::from(format!(
                    "memory-backend-file,id={RAM_BACKEND_ID},size={}M,share=on,mem-path=",
                    self.memory_mib
                ));
                object.push(escape_opt(path.as_os_str()));
                a.pair("-object", object);
            }
            None => a.pair("-machine", format!("{},accel={}", self.machine, self.accel)),
        }
        if let Some(cpu) = &self.cpu {
            a.pair("-cpu", cpu);
        }
        a.pair("-m", format!("{}M", self.memory_mib));
        a.pair("-smp", self.cpus.to_string());
        a.push("-no-reboot");
        let slots = PciSlots::of(self);
        a.pair("-vga", if self.vga { "std" } else { "none" });
        if let Some(slot) = slots.xhci {
            a.pair("-device", format!("qemu-xhci,id=xhci,addr={slot:#x}"));
            a.pair("-device", "usb-tablet,bus=xhci.0");
        }
        if let Some(slot) = slots.virtio_serial {
            a.pair("-device", format!("virtio-serial-pci,id=vser0,addr={slot:#x}"));
            match &self.agent_socket {
                Some(path) => {
                    let mut chardev = OsString::from("socket,id=qga0,server=on,wait=off,path=");
                    chardev.push(escape_opt(path.as_os_str()));
                    a.pair("-chardev", chardev);
                }
                None => a.pair("-chardev", "null,id=qga0"),
            }
            a.pair("-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0");
        }
        match &self.display {
            Display::None => a.pair("-display", "none"),
            Display::Gtk => a.pair("-display", "gtk"),
            Display::Vnc { listen } => {
                a.pair("-display", "none");
                // On a network address the screen needs the session's password (set over QMP after start, see
                // `Vm::set_vnc_password`); a Unix socket is private to its directory already.
                if listen.starts_with("unix:") {
                    a.pair("-vnc", listen);
                } else {
                    a.pair("-vnc", format!("{listen},password=on"));
                }
            }
        }
        // serial port 0: always present (a machine device); only its back end varies
        // (the console log is appended to, so it spans suspends and resumes)
        match (&self.console_log, &self.display) {
            (Some(path), _) if self.console_socket.is_some() => {
                let mut chardev = OsString::from("socket,id=console0,server=on,wait=off,path=");
                chardev.push(escape_opt(self.console_socket.as_deref().unwrap_or(path).as_os_str()));
                chardev.push(",logappend=on,logfile=");
                chardev.push(escape_opt(path.as_os_str()));
                a.pair("-chardev", chardev);
                a.pair("-serial", "chardev:console0");
            }
            (Some(path), _) => {
                let mut chardev = OsString::from("file,id=console0,append=on,path=");
                chardev.push(escape_opt(path.as_os_str()));
                a.pair("-chardev", chardev);
                a.pair("-serial", "chardev:console0");
            }
            (None, Display::Gtk) => a.pair("-serial", "vc"),
            (None, _) => a.pair("-serial", "null"),
        }
        if let Some(k) = &self.kernel {
            a.pair("-kernel", k);
        }
        if let Some(i) = &self.initrd {
            a.pair("-initrd", i);
        }
        if let Some(s) = &self.append {
            a.pair("-append", s);
        }
        // disk: NBD client over a Unix socket; reconnect-delay keeps guest I/O pending (not failing) for a
        // few seconds if the NBD server restarts
        let mut blockdev = OsString::from("driver=nbd,node-name=disk0,server.type=unix,server.path=");
        blockdev.push(escape_opt(self.disk_nbd_socket.as_os_str()));
        if let Some(export) = &self.disk_export {
            blockdev.push(format!(",export={}", export.replace(',', ",,")));
        }
        blockdev.push(",reconnect-delay=5");
        a.pair("-blockdev", blockdev);
        a.pair("-device", format!("virtio-blk-pci,drive=disk0,id=vda,bootindex=1,addr={:#x}", slots.disk));
        // network: the NIC is a machine device, present whatever the policy; `romfile=` skips the iPXE ROM
        // (and always the same back end type, so the NIC offers the guest the same features)
        if let Some(slot) = slots.nic {
            match self.network {
                Network::Nat => a.pair("-netdev", "user,id=net0"),
                Network::None => a.pair("-netdev", "user,id=net0,restrict=on"),
            }
            a.pair(
                "-device",
                format!("virtio-net-pci,id={NIC_ID},mac={NIC_MAC},romfile=,netdev=net0,addr={slot:#x}"),
            );
        }
        let mut qmp = OsString::from("unix:");
        qmp.push(escape_opt(qmp_socket.as_os_str()));
        qmp.push(",server=on,wait=off");
        a.pair("-qmp", qmp);
        if incoming {
            // stay paused after loading the memory image until `cont`
            a.push("-S");
            a.pair("-incoming", "defer");
        }
        a.0.extend(self.extra_args.iter().cloned());
        a.0
    }
}

/// Default QEMU binary name.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// QEMU option values escape ',' as ",,".
fn escape_opt(s: &std::ffi::OsStr) -> OsString {
    match s.to_str() {
        Some(s) => s.replace(',', ",,").into(),
        None => s.to_owned(), // non-UTF-8 path: passed as is
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, s: impl Into<OsString>) {
        self.0.push(s.into());
    }
    fn pair(&mut self, k: &str, v: impl Into<OsString>) {
        self.0.push(k.into());
        self.0.push(v.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn shared_ram_is_a_file_backend_named_like_qemus_own_ram() {
        let mut c = VmConfig::new(384, "/run/isr/disk.sock");
        c.shared_ram = Some("/run/a,b/ram/guest-ram".into());
        let a = strings(&c.qemu_args(Path::new("/run/isr/qmp.sock"), false));
        assert_eq!(value_of(&a, "-machine"), ["pc,accel=tcg,memory-backend=pc.ram"]);
        assert_eq!(
            value_of(&a, "-object"),
            ["memory-backend-file,id=pc.ram,size=384M,share=on,mem-path=/run/a,,b/ram/guest-ram"]
        );
        assert_eq!(value_of(&a, "-m"), ["384M"]);
    }

    #[test]
    fn headless_direct_boot() {
        let mut c = VmConfig::new(256, "/run/isr/disk.sock");
        c.kernel = Some("/k/vmlinuz".into());
        c.initrd = Some("/k/initrd.img".into());
        c.append = Some("console=ttyS0 quiet".into());
        c.console_log = Some("/h/console.log".into());
        let a = strings(&c.qemu_args(Path::new("/run/isr/qmp.sock"), false));
        assert!(a.contains(&"-nodefaults".to_string()));
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(value_of(&a, "-machine"), ["pc,accel=tcg"]);
        assert_eq!(value_of(&a, "-m"), ["256M"]);
        assert_eq!(value_of(&a, "-smp"), ["1"]);
        assert_eq!(value_of(&a, "-vga"), ["none"]);
        assert_eq!(value_of(&a, "-display"), ["none"]);
        assert_eq!(value_of(&a, "-chardev"), ["file,id=console0,append=on,path=/h/console.log"]);
        assert_eq!(value_of(&a, "-serial"), ["chardev:console0"]);
        assert_eq!(value_of(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(value_of(&a, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(value_of(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(
            value_of(&a, "-blockdev"),
            ["driver=nbd,node-name=disk0,server.type=unix,server.path=/run/isr/disk.sock,reconnect-delay=5"]
        );
        assert_eq!(value_of(&a, "-device"), ["virtio-blk-pci,drive=disk0,id=vda,bootindex=1,addr=0x2"]);
        assert!(value_of(&a, "-netdev").is_empty(), "no NIC unless the device model has one");
        assert_eq!(value_of(&a, "-qmp"), ["unix:/run/isr/qmp.sock,server=on,wait=off"]);
        assert!(value_of(&a, "-incoming").is_empty());
        assert!(value_of(&a, "-cpu").is_empty());
    }

    #[test]
    fn incoming_kvm_and_escaping() {
        let mut c = VmConfig::new(1024, "/tmp/a,b/disk.sock");
        c.accel = Accel::Kvm;
        c.cpus = 4;
        c.cpu = Some("qemu64".into());
        c.disk_export = Some("exp".into());
        c.extra_args = vec!["-S".into()];
        let a = strings(&c.qemu_args(Path::new("/tmp/q,1.sock"), true));
        assert_eq!(value_of(&a, "-machine"), ["pc,accel=kvm"]);
        assert_eq!(value_of(&a, "-smp"), ["4"]);
        assert_eq!(value_of(&a, "-cpu"), ["qemu64"]);
        assert_eq!(value_of(&a, "-incoming"), ["defer"]);
        assert!(a.contains(&"-S".to_string()));
        assert_eq!(value_of(&a, "-qmp"), ["unix:/tmp/q,,1.sock,server=on,wait=off"]);
        assert!(value_of(&a, "-blockdev")[0]
            .ends_with("server.path=/tmp/a,,b/disk.sock,export=exp,reconnect-delay=5"));
        assert_eq!(value_of(&a, "-serial"), ["null"]);
        assert_eq!(a.last().unwrap(), "-S");
        assert!(value_of(&a, "-kernel").is_empty());
    }

    #[test]
    fn the_desktop_devices_and_the_agent_channel() {
        let mut c = VmConfig::new(256, "/run/d.sock");
        c.vga = true;
        c.agent_channel = true;
        let a = strings(&c.qemu_args(Path::new("/q"), false));
        assert_eq!(value_of(&a, "-vga"), ["std"]);
        let devices = value_of(&a, "-device");
        assert!(devices.iter().any(|d| d.starts_with("usb-tablet")), "{devices:?}");
        assert!(devices.iter().any(|d| d.contains("name=org.qemu.guest_agent.0")), "{devices:?}");
        assert!(value_of(&a, "-chardev").contains(&"null,id=qga0"));
        // The socket is only the back end: the devices stay the same when it is connected.
        c.agent_socket = Some("/run/qga.sock".into());
        let b = strings(&c.qemu_args(Path::new("/q"), false));
        assert_eq!(value_of(&b, "-device"), devices);
        assert!(value_of(&b, "-chardev").iter().any(|c| c.contains("path=/run/qga.sock")));
    }

    #[test]
    fn displays_do_not_change_devices() {
        let mut c = VmConfig::new(512, "/d.sock");
        c.vga = true;
        let headless = strings(&c.qemu_args(Path::new("/q"), false));
        c.display = Display::Gtk;
        let gtk = strings(&c.qemu_args(Path::new("/q"), false));
        c.display = Display::Vnc { listen: "127.0.0.1:3".into() };
        let vnc = strings(&c.qemu_args(Path::new("/q"), false));
        for a in [&headless, &gtk, &vnc] {
            assert_eq!(value_of(a, "-vga"), ["std"]);
            assert_eq!(value_of(a, "-device"), value_of(&headless, "-device"));
        }
        assert_eq!(value_of(&gtk, "-display"), ["gtk"]);
        assert_eq!(value_of(&gtk, "-serial"), ["vc"]);
        assert_eq!(value_of(&vnc, "-display"), ["none"]);
        assert_eq!(value_of(&vnc, "-vnc"), ["127.0.0.1:3,password=on"], "a network VNC needs the password");
        c.display = Display::Vnc { listen: "unix:/run/x/vnc.sock".into() };
        let unix = strings(&c.qemu_args(Path::new("/q"), false));
        assert_eq!(value_of(&unix, "-vnc"), ["unix:/run/x/vnc.sock"]);
    }

    #[test]
    fn pci_slots_are_those_qemu_assigns() {
        // as `info pci` shows them for the devices without explicit addresses (device models 0, 1, 2)
        let mut c = VmConfig::new(256, "/d.sock");
        assert_eq!(
            PciSlots::of(&c),
            PciSlots { vga: None, xhci: None, virtio_serial: None, disk: 2, nic: None }
        );
        c.vga = true;
        c.agent_channel = true;
        assert_eq!(
            PciSlots::of(&c),
            PciSlots { vga: Some(2), xhci: Some(3), virtio_serial: Some(4), disk: 5, nic: None }
        );
        c.nic = true;
        assert_eq!(
            PciSlots::of(&c),
            PciSlots { vga: Some(2), xhci: Some(3), virtio_serial: Some(4), disk: 5, nic: Some(6) }
        );
        let a = strings(&c.qemu_args(Path::new("/q"), false));
        let devices = value_of(&a, "-device");
        for (prefix, addr) in [
            ("qemu-xhci", "0x3"),
            ("virtio-serial-pci", "0x4"),
            ("virtio-blk-pci", "0x5"),
            ("virtio-net-pci", "0x6"),
        ] {
            let d = devices.iter().find(|d| d.starts_with(prefix)).unwrap();
            assert!(d.ends_with(&format!("addr={addr}")), "{d}");
        }
    }

    #[test]
    fn network_none_keeps_the_nic_on_a_restricted_back_end() {
        let mut c = VmConfig::new(256, "/d.sock");
        c.nic = true;
        assert_eq!(c.network, Network::Nat, "NAT is the default");
        let nat = strings(&c.qemu_args(Path::new("/q"), false));
        c.network = Network::None;
        let none = strings(&c.qemu_args(Path::new("/q"), true));
        assert_eq!(value_of(&nat, "-netdev"), ["user,id=net0"]);
        assert_eq!(value_of(&none, "-netdev"), ["user,id=net0,restrict=on"], "no host, no outside");
        let nic = |a: &[String]| -> Vec<String> {
            value_of(a, "-device")
                .into_iter()
                .filter(|d| d.starts_with("virtio-net-pci"))
                .map(String::from)
                .collect()
        };
        assert_eq!(nic(&nat), ["virtio-net-pci,id=nic0,mac=52:54:00:12:34:56,romfile=,netdev=net0,addr=0x3"]);
        // the same device on the same back end type: a memory image resumes under either setting (the link,
        // set over QMP, is what cuts the network)
        assert_eq!(nic(&none), nic(&nat));
    }
}
