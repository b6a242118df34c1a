package models

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// FuzzCopyRow: whatever a record's strings hold, its COPY text line has
// one field per column, ends at its one newline, and each text field reads
// back, by COPY's rules, as the string it came from; its time is the
// record's, in UTC to the microsecond.
func FuzzCopyRow(f *testing.F) {
	for i, s := range []string{"", "plain", "a\tb", "x\ny", "c\r\nd", `\N`, `\.`, `\\t`, `\x41\101`, "\\", "é☃"} {
		f.Add(s, s+"!", int64(i)*123456789012345)
	}
	f.Fuzz(func(t *testing.T, a, b string, micros int64) {
		// Any time from year 1 to 9999.
		const first, span = -62135596800000000, 315537897600000000
		at := time.UnixMicro(first + (micros%span+span)%span)
		r := RequestLog{CreatedAt: at, Client: a, Path: b, UserAgent: a + b, Status: 200}
		sanitize(&r)
		line := appendCopyRow(nil, &r)
		if bytes.IndexByte(line, '\n') != len(line)-1 || bytes.IndexByte(line, '\r') >= 0 {
			t.Fatalf("the row is not one line: %q", line)
		}
		fields := strings.Split(string(line[:len(line)-1]), "\t")
		if len(fields) != len(requestLogColumns) {
			t.Fatalf("%d fields, want %d: %q", len(fields), len(requestLogColumns), line)
		}
		if want := at.UTC().Format("2006-01-02 15:04:05.000000") + "+00"; fields[0] != want {
			t.Fatalf("created_at %q, want %q", fields[0], want)
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
