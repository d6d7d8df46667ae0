-- Orders whose images have not arrived: the latest message per accession number, oldest first.
SELECT accession_number, argMax(priority, received_at) AS priority, argMax(reason_for_exam, received_at) AS reason_for_exam,
       argMax(order_control, received_at) AS order_control, argMax(source_site, received_at) AS source_site,
       min(received_at) AS first_received_at
FROM orders FINAL
WHERE accession_number != ''
  AND accession_number NOT IN (SELECT accession_number FROM worklist FINAL WHERE accession_number IS NOT NULL)
GROUP BY accession_number
ORDER BY first_received_at
LIMIT {limit:UInt32}
