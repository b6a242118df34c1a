package models

import "github.com/jackc/pgx/v5/pgtype"

// Values handed to pgx by pointer.
//
// pgx takes every value it encodes (an array's elements) as an interface
// value, and a string, a slice or an integer above 255 put into one is
// first copied to the heap: about fifteen allocations per keyed request's
// batch rows (issue 15). A pointer fits in an interface as it is. Pointers to
// these types point into the caller's own values, and pgx's codecs read
// them through their Valuer interfaces (pgtype.TextValuer and friends), so
// nothing is copied. A plain *string would not do: pgx dereferences it
// into an interface again.
type (
	pgText  string
	pgInt8  int64
	pgBool  bool
	pgBytea []byte
)

func (v *pgText) TextValue() (pgtype.Text, error) {
	return pgtype.Text{String: string(*v), Valid: true}, nil
}

func (v *pgInt8) Int64Value() (pgtype.Int8, error) {
	return pgtype.Int8{Int64: int64(*v), Valid: true}, nil
}

func (v *pgBool) BoolValue() (pgtype.Bool, error) {
	return pgtype.Bool{Bool: bool(*v), Valid: true}, nil
}

// BytesValue is NULL for a nil slice, as pgx encodes a nil []byte.
func (v *pgBytea) BytesValue() ([]byte, error) { return *v, nil }

// column is one column of a batch, passed as a PostgreSQL array
// (pgtype.ArrayGetter) whose elements go to pgx as pointers into it.
type column[T any] []T

func (c column[T]) Dimensions() []pgtype.ArrayDimension {
	if c == nil {
		return nil
	}
	return []pgtype.ArrayDimension{{Length: int32(len(c)), LowerBound: 1}}
}

func (c column[T]) Index(i int) any { return &c[i] }

func (c column[T]) IndexType() any { return (*T)(nil) }

// columns makes k columns of n values on one backing array.
func columns[T any](k, n int) []column[T] {
	all := make(column[T], k*n)
	cs := make([]column[T], k)
	for i := range cs {
		cs[i] = all[i*n : (i+1)*n : (i+1)*n]
	}
	return cs
}
