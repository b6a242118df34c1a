package models

import (
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
)

// TestBatchValuesGoToPgxWithoutACopyEach: pgx encodes a batch column with
// no allocation per value. A []string column costs one allocation per
// string, and one of integers one per integer above 255 (issue 15).
func TestBatchValuesGoToPgxWithoutACopyEach(t *testing.T) {
	m := pgtype.NewMap()
	buf := make([]byte, 0, 64<<10)
	encodeAllocs := func(oid uint32, v any) float64 {
		t.Helper()
		if _, err := m.Encode(oid, pgtype.BinaryFormatCode, v, buf[:0]); err != nil {
			t.Fatalf("encode %T: %v", v, err)
		}
		return testing.AllocsPerRun(20, func() { _, _ = m.Encode(oid, pgtype.BinaryFormatCode, v, buf[:0]) })
	}
	columnsOf := func(n int) map[string]struct {
		oid uint32
		v   any
	} {
		text, ints, flags, bodies := columns[pgText](1, n)[0], columns[pgInt8](1, n)[0], make(column[pgBool], n), make(column[pgBytea], n)
		for i := range n {
			text[i], ints[i], flags[i], bodies[i] = pgText(strconv.Itoa(i)), pgInt8(1000+i), i%2 == 0, []byte(strconv.Itoa(i))
		}
		return map[string]struct {
			oid uint32
			v   any
		}{
			"text[]":   {pgtype.TextArrayOID, text},
			"bigint[]": {pgtype.Int8ArrayOID, ints},
			"int[]":    {pgtype.Int4ArrayOID, ints},
			"bool[]":   {pgtype.BoolArrayOID, flags},
			"bytea[]":  {pgtype.ByteaArrayOID, bodies},
		}
	}
	one, many := columnsOf(1), columnsOf(64)
	for name := range one {
		if a, b := encodeAllocs(one[name].oid, one[name].v), encodeAllocs(many[name].oid, many[name].v); b > a {
			t.Errorf("%s: %.0f allocations for 1 element, %.0f for 64", name, a, b)
		}
	}
}
