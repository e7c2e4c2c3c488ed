/// What machine-server offers through QEMU's names, for the probing commands (qom-list-types,
/// device-list-properties, query-command-line-options) and the QEMU command line front end:
/// one table, so what a tool is told matches what `-device`, `-object` and the options accept.
public enum QEMUCapabilities {
    /// A QOM type: its parent, whether it is abstract, and the properties `-device`/`-object` honour.
    public struct QOMType: Sendable {
        public var name: String
        public var parent: String?
        public var abstract: Bool
        /// (name, QOM type, description)
        public var properties: [(name: String, type: String, description: String)]
    }

    /// The properties of each device driver (the description's DeviceDriver enum); `id`, `bus`
    /// are not properties in QEMU and are accepted besides these.
    public static func deviceProperties(_ driver: DeviceDriver) -> [(name: String, type: String, description: String)] {
        let pci = driver.rawValue.hasSuffix("-pci") || driver == .pcieRootPort
        var props: [(name: String, type: String, description: String)] = []
        switch driver {
        case .virtioBlkDevice, .virtioBlkPci:
            props.append(("drive", "str", "Node name or ID of a block device to use as a backend"))
        case .virtioRngDevice, .virtioRngPci:
            props.append(("rng", "link<rng-backend>", "the host entropy source (rng-random or rng-builtin)"))
        case .virtioNetDevice, .virtioNetPci:
            props += [("netdev", "str", "ID of a netdev to use as a backend"),
                      ("mac", "str", "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56")]
        case .pcieRootPort:
            props += [("chassis", "uint8", "chassis number (recorded)"), ("slot", "uint16", "physical slot number"),
                      ("port", "uint8", "port number (recorded)")]
        default: break
        }
        if pci { props.append(("addr", "int32", "Slot and optional function number, example: 06.0 or 06")) }
        if pci && driver != .pcieRootPort {
            // The transport is modern only (1af4:1040+N, no legacy I/O BAR): libvirt reads this
            // property as "virtio devices are PCI Express" and then puts them behind root ports.
            props.append(("disable-legacy", "OnOffAuto", "on or auto: the device is modern-only (off is refused)"))
        }
        return props
    }

    /// QEMU's name for a virtio-blk-pci without the legacy interface; machine-server's
    /// virtio-blk-pci is exactly that, so the name is an alias (libvirt reads its presence as
    /// "virtio devices are PCI Express" and then plugs them into root ports).
    public static let nonTransitionalBlock = "virtio-blk-pci-non-transitional"

    /// Every QOM type machine-server has, parents first.
    public static let types: [QOMType] = {
        var t: [QOMType] = [
            QOMType(name: "object", parent: nil, abstract: true, properties: []),
            QOMType(name: "machine", parent: "object", abstract: true, properties: []),
            QOMType(name: "virt-machine", parent: "machine", abstract: false, properties: []),
            QOMType(name: "none-machine", parent: "machine", abstract: false, properties: []),
            QOMType(name: "device", parent: "object", abstract: true, properties: []),
            QOMType(name: "cpu", parent: "device", abstract: true, properties: []),
            QOMType(name: "riscv-cpu", parent: "cpu", abstract: true, properties: []),
            QOMType(name: "rv64-riscv-cpu", parent: "riscv-cpu", abstract: false, properties: []),
            QOMType(name: "virtio-device", parent: "device", abstract: true, properties: []),
            QOMType(name: "sys-bus-device", parent: "device", abstract: true, properties: []),
            // The board's virtio-mmio transports (8 slots); devices go in them as -device *-device.
            QOMType(name: "virtio-mmio", parent: "sys-bus-device", abstract: false, properties: []),
            QOMType(name: "pci-device", parent: "device", abstract: true, properties: []),
            // The board's generic ECAM PCIe host (built when a -pci device or a root port is
            // given); libvirt takes this type as "riscv virt has PCI" and then accepts
            // pcie-root and pcie-root-port controllers.
            QOMType(name: "pci-host-bridge", parent: "sys-bus-device", abstract: true, properties: []),
            QOMType(name: "pcie-host-bridge", parent: "pci-host-bridge", abstract: true, properties: []),
            QOMType(name: "gpex-pcihost", parent: "pcie-host-bridge", abstract: false, properties: []),
            QOMType(name: "virtio-pci", parent: "pci-device", abstract: true, properties: []),
            QOMType(name: "memory-backend", parent: "object", abstract: true, properties: []),
            QOMType(name: "memory-backend-ram", parent: "memory-backend", abstract: false, properties: [
                ("size", "int", "size of the memory region in bytes (must equal -m)"),
                ("share", "bool", "only off"), ("prealloc", "bool", "only off"),
                ("x-use-canonical-path-for-ramblock-id", "bool", "accepted; no effect on the state stream")]),
            QOMType(name: "memory-backend-file", parent: "memory-backend", abstract: false, properties: [
                ("size", "int", "size of the memory region in bytes (must equal -m)"),
                ("mem-path", "str", "the file, or a directory for an unlinked temporary file"),
                ("share", "bool", "map the file shared (guest writes reach it)"), ("prealloc", "bool", "only off"),
                ("discard-data", "bool", "accepted; the file is left as it is at exit"),
                ("x-use-canonical-path-for-ramblock-id", "bool", "accepted; no effect on the state stream")]),
            QOMType(name: "accel", parent: "object", abstract: true, properties: []),
            QOMType(name: "tcg-accel", parent: "accel", abstract: false, properties: []),
            QOMType(name: "rng-backend", parent: "object", abstract: true, properties: []),
            QOMType(name: "rng-builtin", parent: "rng-backend", abstract: false, properties: []),
            QOMType(name: "rng-random", parent: "rng-backend", abstract: false, properties: [
                ("filename", "str", "/dev/urandom or /dev/random")]),
            QOMType(name: "chardev", parent: "object", abstract: true, properties: []),
        ]
        for c in ["chardev-socket", "chardev-file", "chardev-ringbuf", "chardev-stdio", "chardev-pty", "chardev-null"] {
            t.append(QOMType(name: c, parent: "chardev", abstract: false, properties: []))
        }
        for d in DeviceDriver.allCases {
            let parent = d == .pcieRootPort ? "pci-device" : d.rawValue.hasSuffix("-pci") ? "virtio-pci" : "virtio-device"
            t.append(QOMType(name: d.rawValue, parent: parent, abstract: false, properties: deviceProperties(d)))
        }
        t.append(QOMType(name: nonTransitionalBlock, parent: "virtio-pci", abstract: false,
                         properties: deviceProperties(.virtioBlkPci)))
        return t
    }()

    /// The type named `name`, if machine-server has it.
    public static func type(_ name: String) -> QOMType? { types.first { $0.name == name } }

    /// True when `name` is `ancestor` or derives from it.
    public static func type(_ name: String, implements ancestor: String) -> Bool {
        var current: String? = name
        while let c = current {
            if c == ancestor { return true }
            current = type(c)?.parent
        }
        return false
    }

    /// QEMU's option groups with the parameters the command line front end honours
    /// (query-command-line-options). Options not listed take no key=value parameters here.
    public static let commandLineOptions: [(option: String, parameters: [(name: String, type: String)])] = [
        ("machine", [("type", "string"), ("accel", "string"), ("usb", "boolean"), ("dump-guest-core", "boolean"),
                     ("memory-backend", "string")]),
        ("accel", [("accel", "string"), ("thread", "string")]),
        ("memory", [("size", "size")]),
        ("smp-opts", [("cpus", "number"), ("sockets", "number"), ("dies", "number"), ("clusters", "number"),
                      ("cores", "number"), ("threads", "number"), ("maxcpus", "number")]),
        ("name", [("guest", "string"), ("debug-threads", "boolean")]),
        ("overcommit", [("mem-lock", "boolean"), ("cpu-pm", "boolean")]),
        ("action", [("reboot", "string"), ("shutdown", "string")]),
        ("drive", [("file", "string"), ("format", "string"), ("if", "string"), ("id", "string"), ("index", "number"),
                   ("readonly", "boolean"), ("media", "string"), ("cache", "string"), ("discard", "string"),
                   ("aio", "string"), ("werror", "string"), ("rerror", "string")]),
        ("mon", [("chardev", "string"), ("mode", "string"), ("pretty", "boolean"), ("id", "string")]),
        ("chardev", []),
        // As QEMU's: -netdev's parameters depend on its type and are described by the QAPI
        // schema (Netdev in query-qmp-schema), so the option group lists none.
        ("netdev", []),
    ]
}
