// Package soak holds opt-in, long-running tests of the proxy binary: a
// mixed-traffic soak with faults (client disconnects, upstream 500s and a
// PostgreSQL restart), a memory test with hundreds of concurrent streams,
// and wrk throughput runs. They run only with SOAK=1; see README.md.
package soak
