//! The methods `kv-validate --sweep` compares by default, as kv-compress
//! flags: defined here, below both binaries, so that kv-validate's sweep
//! scores them and `cargo xtask bench` times them from one list.

/// The built-in matrix (`--sweep`): issue 5's reference methods, rotation,
/// kept tokens, then the combinations aimed at its targets (docs/fidelity.md
/// has the measurements that chose them). Every variant runs at group 64
/// unless its flags say otherwise. Kept tokens are stored as FP16 and count
/// in bits/value: with a 384-token context, 4 sink tokens cost 4·16/384 =
/// 0.17 bits/value, 32 recent ones 1.33. `mse` = `-fit mse`; `k128-vf256` =
/// keys in per-channel groups of 128 tokens, values in flat groups of 256,
/// which moves scale bytes from the values to the keys, which need them more;
/// `ko1` = 1% of key values kept in FP16 (`-key-outliers 0.01`).
pub const DEFAULT_MATRIX: &[(&str, &str)] = &[
    ("adr002-g64", ""),
    ("adr002-g32", "-group-size 32"),
    ("adr002-g128", "-group-size 128"),
    (
        "token-asym4",
        "-grid asym -key-axis token -value-axis token",
    ),
    ("int8", "-bits 8"),
    ("kivi4", "-method kivi -bits 4"),
    ("kivi3", "-method kivi -bits 3"),
    ("kivi2", "-method kivi -bits 2"),
    ("kivi4-rot", "-method kivi -bits 4 -rotate"),
    ("kivi3-rot", "-method kivi -bits 3 -rotate"),
    ("kivi2-rot", "-method kivi -bits 2 -rotate"),
    (
        "kivi4-sink4-recent32",
        "-method kivi -bits 4 -sink-tokens 4 -recent-tokens 32",
    ),
    (
        "kivi4-sym-rot-sink4",
        "-method kivi -bits 4 -grid sym -rotate -sink-tokens 4",
    ),
    (
        "kivi4-rot-mse-k128-vf256-sink4",
        "-method kivi -bits 4 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 4",
    ),
    (
        "kivi3-sym-rot-sink4",
        "-method kivi -bits 3 -grid sym -rotate -sink-tokens 4",
    ),
    (
        "kivi3-rot-g128-sink4",
        "-method kivi -bits 3 -rotate -group-size 128 -sink-tokens 4",
    ),
    (
        "kivi3-rot-mse-k128-vf256-sink1",
        "-method kivi -bits 3 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1",
    ),
    (
        "kivi3-rot-mse-k128-vf256-sink1-ko1",
        "-method kivi -bits 3 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1 -key-outliers 0.01",
    ),
    (
        "kivi2-sym-rot-sink4",
        "-method kivi -bits 2 -grid sym -rotate -sink-tokens 4",
    ),
    (
        "kivi2-rot-g128-sink4",
        "-method kivi -bits 2 -rotate -group-size 128 -sink-tokens 4",
    ),
    (
        "kivi2-rot-mse-g128-sink4",
        "-method kivi -bits 2 -rotate -fit mse -group-size 128 -sink-tokens 4",
    ),
    (
        "kivi2-rot-mse-k128-vf256-sink1",
        "-method kivi -bits 2 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1",
    ),
    (
        "kivi2-rot-mse-k64-vf256-sink4",
        "-method kivi -bits 2 -rotate -fit mse -key-group-size 64 -value-axis flat -value-group-size 256 -sink-tokens 4",
    ),
    (
        "kivi2-rot-mse-k128-vf256-sink1-ko1",
        "-method kivi -bits 2 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1 -key-outliers 0.01",
    ),
    (
        "kivi2-rot-mse-k64-vf256-sink2-ko05",
        "-method kivi -bits 2 -rotate -fit mse -key-group-size 64 -value-axis flat -value-group-size 256 -sink-tokens 2 -key-outliers 0.005",
    ),
    // Codebooks (issue 9): KIVI's axes and sinks with non-uniform levels,
    // Lloyd-Max for the Gaussian that rotated coordinates follow, or k-means
    // levels fitted to each tensor.
    (
        "lloyd4-rot-kch-sink4",
        "-grid lloyd -bits 4 -rotate -key-axis channel -value-axis token -sink-tokens 4",
    ),
    (
        "lloyd3-rot-kch-sink4",
        "-grid lloyd -bits 3 -rotate -key-axis channel -value-axis token -sink-tokens 4",
    ),
    (
        "lloyd2-rot-kch-sink4",
        "-grid lloyd -bits 2 -rotate -key-axis channel -value-axis token -sink-tokens 4",
    ),
    (
        "kmeans3-rot-kch-sink4",
        "-grid kmeans -bits 3 -rotate -key-axis channel -value-axis token -sink-tokens 4",
    ),
    (
        "kmeans2-rot-kch-sink4",
        "-grid kmeans -bits 2 -rotate -key-axis channel -value-axis token -sink-tokens 4",
    ),
    // Entropy-coded uniform codes (ecsq): one step per tensor around each
    // channel's mean, sized by -rate to the budgets.
    (
        "ecsq-r4.35-sink1",
        "-method kivi -grid ecsq -rate 4.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
    (
        "ecsq-r3.35-sink1",
        "-method kivi -grid ecsq -rate 3.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
    (
        "ecsq-r2.35-sink1",
        "-method kivi -grid ecsq -rate 2.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
    // Per-layer bits: the first layer's keys at 4 bits, the rest at 2.
    (
        "kivi2-rot-sink4-k0at4",
        "-method kivi -bits 2 -rotate -sink-tokens 4 -layer-bits k:0=4",
    ),
    (
        "lloyd2-rot-kch-sink4-k0at4",
        "-grid lloyd -bits 2 -rotate -key-axis channel -value-axis token -sink-tokens 4 -layer-bits k:0=4",
    ),
];
