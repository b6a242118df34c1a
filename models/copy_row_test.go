package models

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// FuzzCopyRow: whatever a record's strings hold, its COPY text line has
// one field per column, ends at its one newline, and each text field reads
// back, by COPY's rules, as the string it came from.
func FuzzCopyRow(f *testing.F) {
	for _, s := range []string{"", "plain", "a\tb", "x\ny", "c\r\nd", `\N`, `\.`, `\\t`, `\x41\101`, "\\", "é☃"} {
		f.Add(s, s+"!")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		r := RequestLog{CreatedAt: time.Date(2026, 12, 8, 0, 0, 0, 123456000, time.UTC), Client: a, Path: b, UserAgent: a + b, Status: 200}
		sanitize(&r)
		line := appendCopyRow(nil, &r)
		if bytes.IndexByte(line, '\n') != len(line)-1 || bytes.IndexByte(line, '\r') >= 0 {
			t.Fatalf("the row is not one line: %q", line)
		}
		fields := strings.Split(string(line[:len(line)-1]), "\t")
		if len(fields) != len(requestLogColumns) {
			t.Fatalf("%d fields, want %d: %q", len(fields), len(requestLogColumns), line)
		}
		for i, want := range map[int]string{1: r.Client, 3: r.Path, 22: r.UserAgent} {
			if got := unescapeCopyText(fields[i]); got != want {
				t.Fatalf("%s reads back as %q, want %q", requestLogColumns[i], got, want)
			}
		}
	})
}

// unescapeCopyText reads a COPY text value as PostgreSQL does, for the
// escapes a row may hold.
func unescapeCopyText(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		i++
		switch s[i] {
		case 't':
			b.WriteByte('\t')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}
