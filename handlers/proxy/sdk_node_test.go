package proxy_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// nodeSDK is the official OpenAI Node SDK, installed by
// `npm ci --prefix handlers/proxy/testdata/node-sdk` (CI does).
const nodeSDK = "testdata/node-sdk"

// TestNodeSDKRetriesJoin: the Node SDK with its default settings against a
// 6 s call, four same-key calls at once. Without joining, it retried the
// 409s twice and three of the four calls failed with a ConflictError.
func TestNodeSDKRetriesJoin(t *testing.T) {
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat(filepath.Join(nodeSDK, "node_modules", "openai", "package.json"))
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the Node SDK test cannot run under CI: %v", err)
		}
		t.Skipf("no Node.js or no SDK (npm ci --prefix handlers/proxy/%s): %v", nodeSDK, err)
	}
	up := newJoinUpstream(t, &joinUpstream{delay: 6 * time.Second})
	px := apptest.Start(t, up.url, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "join.mjs")
	cmd.Dir = nodeSDK
	cmd.Env = append(os.Environ(), "OPENAI_BASE_URL="+px.URL+"/v1", "OPENAI_API_KEY="+apptest.ClientKey,
		"IDEMPOTENCY_KEY=node-sdk-join", "CALLS=4")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 4 {
		t.Fatalf("want 4 results, got:\n%s", out)
	}
	var first string
	for i, line := range lines {
		var r struct{ ID, Error string }
		if err := json.Unmarshal([]byte(line), &r); err != nil || r.Error != "" || r.ID == "" {
			t.Fatalf("call %d: %s", i, line)
		}
		if first == "" {
			first = r.ID
		}
		if r.ID != first {
			t.Fatalf("call %d answered %q, call 0 %q: want the one answer", i, r.ID, first)
		}
	}
	if n := up.calls.Load(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}
