// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "ublk-http",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "ublk-http", targets: ["ublk-http"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // ABI only: liburing plus the project's own ublk UAPI (the system header is from 6.1).
        .target(
            name: "CUring",
            linkerSettings: [.linkedLibrary("uring")]
        ),
        // The engine (control ring, queues, lifecycle) and the targets.
        .target(
            name: "UblkTarget",
            dependencies: ["CUring", "PageCache"]
        ),
        // The command line: argument parsing, JSON output, daemonizing. Nothing else.
        .target(
            name: "UblkCLI",
            dependencies: [
                "UblkTarget",
                "UblkService",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // The host service: the device table, systemd's units and notifications, metrics files.
        .target(
            name: "UblkService",
            dependencies: ["UblkTarget"]
        ),
        .executableTarget(
            name: "ublk-http",
            dependencies: ["UblkCLI"]
        ),
        // ABI only: non-variadic wrappers for libcurl's variadic calls.
        .target(
            name: "CCurl",
            linkerSettings: [.linkedLibrary("curl")]
        ),
        // ABI only: SHA-256 from OpenSSL's libcrypto (an image's identity digest).
        .target(
            name: "CLibcrypto",
            linkerSettings: [.linkedLibrary("crypto")]
        ),
        // The cache engine: page bitmap, cache file, fetch planner, HTTP range source.
        // No kernel, no io_uring: fully host-testable.
        .target(
            name: "PageCache",
            dependencies: ["CCurl", "CLibcrypto"]
        ),
        .testTarget(
            name: "PageCacheTests",
            dependencies: ["PageCache"]
        ),
        .testTarget(
            name: "UblkTargetTests",
            dependencies: ["UblkTarget", "UblkCLI", "UblkService", "CUring", "PageCache"]
        ),
    ],
    swiftLanguageModes: [.v5]
)
