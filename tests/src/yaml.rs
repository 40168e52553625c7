//! The agent's endpoints file, written for a test.

/// Endpoints YAML for one service over some pods.
pub fn endpoints_yaml(
    name: &str,
    vips: &[&str],
    port: u16,
    target_port: u16,
    algorithm: &str,
    endpoints: &[String],
) -> String {
    let mut y = format!(
        "services:\n  - name: {name}\n    addresses: [{}]\n    ports:\n      - port: {port}\n        targetPort: {target_port}\n        algorithm: {algorithm}\n    endpoints:\n",
        vips.iter()
            .map(|v| format!("'{v}'"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if endpoints.is_empty() {
        y = y.replace("    endpoints:\n", "    endpoints: []\n");
    }
    for e in endpoints {
        y += &format!("      - address: '{e}'\n");
    }
    y
}
