package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"maps"
	"mime/multipart"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzIdempotencyKey: a key is accepted only as 1–255 printable ASCII
// characters, and the quoted form of an accepted bare key is the same key.
func FuzzIdempotencyKey(f *testing.F) {
	for _, s := range []string{"abc", `"abc"`, `"a\"b"`, "", `"`, "naïve", strings.Repeat("x", 255), `"\\"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		key, ok := parseIdempotencyKey([][]byte{[]byte(raw)})
		if !ok {
			return
		}
		if len(key) == 0 || len(key) > 255 {
			t.Fatalf("accepted %q of length %d", key, len(key))
		}
		for i := 0; i < len(key); i++ {
			if key[i] < 0x20 || key[i] > 0x7e {
				t.Fatalf("accepted a non-printable byte in %q", key)
			}
		}
		if strings.TrimSpace(key) == key && key[0] != '"' {
			quoted := `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(key) + `"`
			if again, ok := parseIdempotencyKey([][]byte{[]byte(quoted)}); !ok || again != key {
				t.Fatalf("quoted form %s of %q parsed as %q, %v", quoted, key, again, ok)
			}
		}
	})
}

func multipartBody(boundary string, parts [][3]string) ([]byte, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	_ = mw.SetBoundary(boundary)
	for _, p := range parts {
		if p[1] != "" {
			w, _ := mw.CreateFormFile(p[0], p[1])
			_, _ = w.Write([]byte(p[2]))
		} else {
			_ = mw.WriteField(p[0], p[2])
		}
	}
	_ = mw.Close()
	return buf.Bytes(), mw.FormDataContentType()
}

func fingerprint(body []byte, contentType string) [32]byte {
	h := sha256.New()
	_ = hashBody(h, contentType, bytes.NewReader(body))
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// FuzzMultipartFingerprint: the fingerprint ignores the boundary and sees
// every change to a part.
func FuzzMultipartFingerprint(f *testing.F) {
	f.Add("purpose", "batch", "file", "data.jsonl", `{"a":1}`, "b1", "b2", byte(0))
	f.Fuzz(func(t *testing.T, name1, value1, name2, filename, content, b1, b2 string, flip byte) {
		valid := func(b string) bool {
			return len(b) >= 1 && len(b) <= 70 && strings.Trim(b, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") == ""
		}
		if !valid(b1) || !valid(b2) || name1 == "" || name2 == "" || filename == "" ||
			strings.ContainsAny(name1+name2+filename, "\"\r\n\\") || strings.Contains(value1+content, "--") {
			return
		}
		// A boundary never occurs in the content it delimits (RFC 2046 §5.1.1);
		// real clients pick long random ones.
		// Field names and filenames are printable text in real forms; a form
		// the parser rejects falls back to hashing the raw bytes.
		for _, r := range name1 + name2 + filename {
			if r < 0x20 || r > 0x7e {
				return
			}
		}
		all := name1 + value1 + name2 + filename + content
		if strings.Contains(all, b1) || strings.Contains(all, b2) {
			return
		}
		parts := [][3]string{{name1, "", value1}, {name2, filename, content}}
		x, ctX := multipartBody(b1, parts)
		y, ctY := multipartBody(b2, parts)
		if fingerprint(x, ctX) != fingerprint(y, ctY) {
			t.Fatalf("boundaries %q and %q give different fingerprints", b1, b2)
		}
		changed := [][3]string{{name1, "", value1}, {name2, filename, content + string(rune('a'+flip%26))}}
		z, ctZ := multipartBody(b2, changed)
		if fingerprint(x, ctX) == fingerprint(z, ctZ) {
			t.Fatal("a changed part gave the same fingerprint")
		}
	})
}

// FuzzStoredHeaders: the stored headers decode, with encoding/json, to
// what json.Marshal of the same map decodes to (invalid UTF-8 included),
// and are byte for byte json.Marshal's when the strings are valid UTF-8.
func FuzzStoredHeaders(f *testing.F) {
	f.Add("Content-Type", "application/json", "Openai-Processing-Ms", "12")
	f.Add("X-A", "<b>&\"\\\n\t\x01\u2028", "X-B", "bad\xff\xfe")
	f.Add("", "", "é", "☃")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		h := map[string]string{k1: v1, k2: v2}
		got := storedHeaders(h)
		want, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		var gotMap, wantMap map[string]string
		if err := json.Unmarshal([]byte(got), &gotMap); err != nil {
			t.Fatalf("stored headers %q do not decode: %v", got, err)
		}
		if err := json.Unmarshal(want, &wantMap); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(gotMap, wantMap) {
			t.Fatalf("stored %q decodes to %q, json.Marshal's to %q", got, gotMap, wantMap)
		}
		valid := utf8.ValidString(k1) && utf8.ValidString(v1) && utf8.ValidString(k2) && utf8.ValidString(v2)
		if valid && got != string(want) {
			t.Fatalf("stored %q, json.Marshal %q", got, want)
		}
	})
}

// BenchmarkStoredHeaders encodes a keyed answer's stored headers.
func BenchmarkStoredHeaders(b *testing.B) {
	h := map[string]string{"Content-Type": "application/json", "X-Request-Id": "req_0123456789abcdef0123456789abcdef",
		"Openai-Processing-Ms": "412", "Openai-Version": "2020-10-01", "Openai-Organization": "org-abcdef0123456789"}
	b.ReportAllocs()
	for b.Loop() {
		_ = storedHeaders(h)
	}
}
