// swift-tools-version:6.0
import PackageDescription

/// Hot-path modules are always compiled with optimisation, even in debug builds:
/// an unoptimised interpreter is far too slow to boot a kernel inside a test.
let optimized: [SwiftSetting] = [.unsafeFlags(["-Ounchecked"])]

let package = Package(
    name: "machine-server",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "machine-server", targets: ["machine-server"]),
        .executable(name: "machine-img", targets: ["machine-img"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
    ],
    targets: [
        // C libraries from Debian's -dev packages.
        .systemLibrary(name: "CJansson", pkgConfig: "jansson", providers: [.apt(["libjansson-dev"])]),
        .systemLibrary(name: "CVNCServer", pkgConfig: "libvncserver", providers: [.apt(["libvncserver-dev"])]),
        .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
        // libslirp without pkg-config (its .pc file requires glib-2.0's; the header needs no glib).
        .systemLibrary(name: "CSlirp", providers: [.apt(["libslirp-dev"])]),

        // Atomic read-modify-write on guest RAM for AMOs and LR/SC across vCPU threads.
        .target(name: "CAtomics"),

        // Core vocabulary: guest memory, bus, interrupt lines, clock, the machine façade.
        .target(name: "Machine", swiftSettings: optimized),
        // RV64GC CPU: decoder, translation-block cache, soft TLB, executor.
        .target(name: "Translator", dependencies: ["Machine", "CAtomics"],
                swiftSettings: optimized + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]),
        // Disk image formats (raw, qcow2), shared by virtio-blk and machine-img.
        .target(name: "Storage", dependencies: ["CZlib"]),
        // Devices: UART, ACLINT, PLIC, test device, RTC, HTIF, virtio transport and devices.
        .target(name: "Devices", dependencies: ["Machine", "Storage", .product(name: "Logging", package: "swift-log")],
                swiftSettings: optimized),
        // Network backends (netdevs): user-mode NAT on libslirp, stream sockets between machines.
        .target(name: "Net", dependencies: ["Machine", "CSlirp"]),
        // Board assembly: the `virt` layout, device tree, boot loading, the running machine.
        .target(name: "Board", dependencies: ["Machine", "Translator", "Devices", "Storage", "CZlib",
                                             .product(name: "Logging", package: "swift-log")]),
        // Schema runtime: JSON values (libjansson), and the types generated from schema/.
        .target(name: "Schema", dependencies: ["CJansson"]),
        // The schema compiler: schema/*.json -> Swift types, validation, dispatch, introspection.
        .executableTarget(name: "schema-gen"),
        // The QMP server.
        .target(name: "QMP", dependencies: ["Machine", "Schema",
                                           .product(name: "NIOCore", package: "swift-nio"),
                                           .product(name: "NIOPosix", package: "swift-nio"),
                                           .product(name: "Logging", package: "swift-log")]),
        // The VNC server (libvncserver) and the display/input plumbing behind it.
        .target(name: "VNC", dependencies: ["Machine", "CVNCServer", .product(name: "Logging", package: "swift-log")]),
        // The seeded mutation fuzzer the tests run over every parser of outside input.
        .target(name: "FuzzSupport"),

        .executableTarget(
            name: "machine-server",
            dependencies: [
                "Machine", "Translator", "Devices", "Board", "Schema", "QMP", "VNC", "Storage", "Net",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(
            name: "machine-img",
            dependencies: ["Storage", "Machine", .product(name: "ArgumentParser", package: "swift-argument-parser")]),

        .testTarget(name: "MachineTests", dependencies: ["Machine"]),
        .testTarget(name: "TranslatorTests", dependencies: ["Translator", "Machine"]),
        .testTarget(name: "StorageTests", dependencies: ["Storage", "FuzzSupport"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Machine", "Storage", "FuzzSupport"]),
        .testTarget(name: "BoardTests", dependencies: ["Board", "Machine", "Devices", "Translator", "FuzzSupport"]),
        .testTarget(name: "SchemaTests", dependencies: ["Schema", "FuzzSupport"]),
        .testTarget(name: "QMPTests", dependencies: ["QMP", "Schema", "Machine", "FuzzSupport"]),
        .testTarget(name: "NetTests", dependencies: ["Net", "Machine", "FuzzSupport"]),
        .testTarget(name: "VNCTests", dependencies: ["VNC", "Machine", "FuzzSupport"]),
    ]
)
