import Machine
import Schema

/// The probing commands (schema/probe.json): answers from the event list, the QOM type table
/// (`QEMUCapabilities`) and the machine types. Thin: no machine state is touched.
extension QMPCommandExecutor {
    /// The guest architecture.
    public func queryTarget() throws -> TargetInfo { TargetInfo(arch: .riscv64) }

    /// Every event of the schema.
    public func queryEvents() throws -> [EventInfo] { QMPEvent.names.map { EventInfo(name: $0) } }

    /// No KVM.
    public func queryKvm() throws -> KvmInfo { KvmInfo(enabled: false, present: false) }

    /// 'virt' (up to 8 harts, RAM as a memory-backend-ram) and 'none'.
    public func queryMachines() throws -> [MachineInfo] {
        [MachineInfo(name: "virt", cpuMax: 8, hotpluggableCpus: false, numaMemSupported: false, deprecated: false,
                     defaultCpuType: "rv64-riscv-cpu", defaultRamId: "riscv_virt_board.ram"),
         MachineInfo(name: "none", cpuMax: 1, hotpluggableCpus: false, numaMemSupported: false, deprecated: false)]
    }

    /// The one CPU model.
    public func queryCpuDefinitions() throws -> [CpuDefinitionInfo] {
        [CpuDefinitionInfo(name: "rv64", migrationSafe: true, static: false, unavailableFeatures: [],
                           typename: "rv64-riscv-cpu", deprecated: false)]
    }

    /// The QOM types, filtered by `implements` and `abstract` as QEMU filters them.
    public func qomListTypes(_ arguments: QomListTypesArguments) throws -> [ObjectTypeInfo] {
        QEMUCapabilities.types.filter { t in
            (arguments.abstract == true || !t.abstract)
                && (arguments.implements.map { QEMUCapabilities.type(t.name, implements: $0) } ?? true)
        }.map { ObjectTypeInfo(name: $0.name, abstract: $0.abstract ? true : nil, parent: $0.parent) }
    }

    /// A device type's properties.
    public func deviceListProperties(_ arguments: DeviceListPropertiesArguments) throws -> [ObjectPropertyInfo] {
        guard let t = QEMUCapabilities.type(arguments.typename), QEMUCapabilities.type(t.name, implements: "device") else {
            throw QMPError(.deviceNotFound, "Device '\(arguments.typename)' not found")
        }
        guard !t.abstract else { throw QMPError(.genericError, "Parameter 'typename' expects a non-abstract device type") }
        return Self.propertyInfo(t)
    }

    /// Any type's properties.
    public func qomListProperties(_ arguments: QomListPropertiesArguments) throws -> [ObjectPropertyInfo] {
        guard let t = QEMUCapabilities.type(arguments.typename) else {
            throw QMPError(.deviceNotFound, "Class '\(arguments.typename)' not found")
        }
        return Self.propertyInfo(t)
    }

    /// The command-line options with key=value parameters.
    public func queryCommandLineOptions(_ arguments: QueryCommandLineOptionsArguments) throws -> [CommandLineOptionInfo] {
        let all = QEMUCapabilities.commandLineOptions
        let chosen = arguments.option.map { o in all.filter { $0.option == o } } ?? all
        if let o = arguments.option, chosen.isEmpty { throw QMPError(.genericError, "invalid option name: \(o)") }
        return chosen.map { opt in
            CommandLineOptionInfo(option: opt.option, parameters: opt.parameters.map {
                CommandLineParameterInfo(name: $0.name, type: CommandLineParameterType(rawValue: $0.type) ?? .string)
            })
        }
    }

    static func propertyInfo(_ t: QEMUCapabilities.QOMType) -> [ObjectPropertyInfo] {
        t.properties.map { ObjectPropertyInfo(name: $0.name, type: $0.type, description: $0.description) }
    }
}
