package usage

import (
	"bytes"
	"runtime"
	"testing"
)

// TestDeepNestingCostsNoStack: JSON nested millions deep (a hostile
// client's request body, or an upstream echoing one) is refused by every
// reader of whole bodies without growing the goroutine's stack. A
// recursive validator grows it by about 125 bytes a level: 4 MiB of "[",
// the largest request body read whole, would take 500 MiB, and 8 MiB,
// the largest keyed answer stored, overflows Go's 1 GB limit and ends the
// process.
func TestDeepNestingCostsNoStack(t *testing.T) {
	deep := func(prefix string, n int) []byte {
		return append([]byte(prefix), bytes.Repeat([]byte("["), n)...)
	}
	for _, tc := range []struct {
		name string
		read func() bool // reports whether the body was taken as JSON
	}{
		{"Valid", func() bool { return Valid(deep("", 8<<20)) }},
		{"FromJSON, deep usage", func() bool { _, ok := FromJSON(deep(`{"usage":{"a":`, 8<<20)); return ok }},
		{"FromJSON, deep elsewhere", func() bool {
			_, ok := FromJSON(append(deep(`{"choices":`, 8<<20), `],"usage":{"total_tokens":1}}`...))
			return ok
		}},
		{"AskForStreamUsage", func() bool { _, ok := AskForStreamUsage(deep(`{"stream":true,"messages":`, 4<<20)); return ok }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			ok := tc.read()
			runtime.ReadMemStats(&after) // before a GC can shrink the stack back
			if ok {
				t.Error("nested beyond any real body, yet taken as JSON")
			}
			if grew := int64(after.StackInuse) - int64(before.StackInuse); grew > 1<<20 {
				t.Errorf("the stack grew by %d MiB", grew>>20)
			}
		})
	}
}
